//! The `agent-vault` binary: the server and the CLI in one. Parsing and dispatch only;
//! everything else is in the library.

fn main() -> std::process::ExitCode {
    agent_vault::cli::main()
}
