//! gRPC unary calls over h2c, for the gRPC pair (k, l): the upstream and the load.
//!
//! wrk speaks HTTP/1.1 only, so both ends are this program's own, on the `h2` crate
//! over tokio. The upstream answers every `POST` as a gRPC server does (`200`,
//! `content-type: application/grpc`, one length-prefixed message, trailers
//! `grpc-status: 0`) and counts what it saw in the same [`Seen`] as the HTTP/1.1
//! upstream, so the same checks apply. The agents speak HTTP/2 with prior knowledge to
//! Envoy's plain listener (`codec_type: AUTO`), `:authority` the upstream's
//! `host:port` as the service names it, `proxy-authorization` as a header.
//!
//! Each side runs a current-thread runtime on one thread: the upstream, like the load
//! generator, takes one core at most, as wrk's one thread does for the other variants.
//! [`Load::open`] connects and warms up every connection; only [`Load::run`] starts the
//! clock, so connection setup never counts in a measured window (and the caller reads
//! CPU and counters between the two).

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tokio::runtime::Runtime;

use crate::load::Run;
use crate::upstream::{Seen, Upstream};

/// The method every call names.
pub const PATH: &str = "/bench.Echo/Unary";
/// The payload of a call's one message: its body is these bytes behind the 5-byte
/// gRPC prefix.
const PAYLOAD: &[u8] = b"agent-vault bench: one unary gRPC call";
/// The size of a call's body: [`PAYLOAD`] behind the prefix.
pub const MESSAGE_BYTES: usize = 5 + PAYLOAD.len();
/// The upstream's answer: one message holding `ok`.
const ANSWER: &[u8] = &[0, 0, 0, 0, 2, b'o', b'k'];

/// A gRPC message: the flag byte (uncompressed), the payload's length big-endian, then
/// the payload.
fn message(payload: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(5 + payload.len());
    framed.push(0);
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(payload);
    Bytes::from(framed)
}

fn runtime() -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
}

/// Starts the gRPC upstream on a free loopback port; `credential_line` is the header
/// line that proves injection (`authorization: Bearer sk_...`), as for
/// [`Upstream::start`].
pub fn upstream(credential_line: &str) -> std::io::Result<Upstream> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let runtime = runtime()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let seen = Arc::new(Seen::default());
    let counters = seen.clone();
    let credential: Arc<str> = credential_line
        .split_once(':')
        .map_or("", |(_, value)| value.trim())
        .into();
    std::thread::Builder::new()
        .name("grpc-upstream".into())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (counters, credential) = (counters.clone(), credential.clone());
                    tokio::spawn(async move {
                        let Ok(mut connection) = h2::server::handshake(stream).await else {
                            return;
                        };
                        while let Some(Ok((request, respond))) = connection.accept().await {
                            let (counters, credential) = (counters.clone(), credential.clone());
                            tokio::spawn(async move {
                                let _ = answer(request, respond, &counters, &credential).await;
                            });
                        }
                    });
                }
            });
        })?;
    Ok(Upstream { port, seen })
}

/// One call at the upstream: counts its headers, reads its body, answers.
async fn answer(
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    seen: &Seen,
    credential: &str,
) -> Result<(), h2::Error> {
    let (head, mut body) = request.into_parts();
    seen.requests.fetch_add(1, Ordering::Relaxed);
    let carries = |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok());
    if carries("authorization").is_some_and(|v| v.eq_ignore_ascii_case(credential)) {
        seen.with_credential.fetch_add(1, Ordering::Relaxed);
    }
    if head.headers.contains_key("proxy-authorization") {
        seen.with_proxy_authorization
            .fetch_add(1, Ordering::Relaxed);
    }
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if head.method != Method::POST {
        let response = Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .body(())
            .unwrap_or_default();
        respond.send_response(response, true)?;
        return Ok(());
    }
    let response = Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .unwrap_or_default();
    let mut stream = respond.send_response(response, false)?;
    stream.send_data(Bytes::from_static(ANSWER), false)?;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    stream.send_trailers(trailers)
}

/// What an agent's calls carry.
#[derive(Debug, Clone)]
pub struct Call {
    /// Envoy's listener.
    pub proxy_port: u16,
    /// The `:authority`: the upstream's `host:port` as the service names it.
    pub authority: String,
    /// The `proxy-authorization` value.
    pub proxy_authorization: String,
}

/// How one call ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    /// From the trailers, or from the headers of a trailers-only answer.
    pub grpc_status: Option<String>,
}

impl Outcome {
    /// A call counts as OK only with `200` and `grpc-status: 0`.
    pub fn ok(&self) -> bool {
        self.status == 200 && self.grpc_status.as_deref() == Some("0")
    }
}

/// The request of every call, and its one message.
struct Prepared {
    uri: String,
    proxy_authorization: HeaderValue,
    body: Bytes,
}

impl Prepared {
    fn new(call: &Call) -> Result<Prepared, String> {
        Ok(Prepared {
            uri: format!("http://{}{PATH}", call.authority),
            proxy_authorization: HeaderValue::from_str(&call.proxy_authorization)
                .map_err(|e| format!("proxy-authorization: {e}"))?,
            body: message(PAYLOAD),
        })
    }

    /// One unary call on `client`: the request and its message, then the answer's
    /// headers, messages and trailers.
    async fn call(&self, client: SendRequest<Bytes>) -> Result<Outcome, String> {
        let mut client = client.ready().await.map_err(|e| e.to_string())?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.as_str())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("proxy-authorization", self.proxy_authorization.clone())
            .body(())
            .map_err(|e| e.to_string())?;
        let (response, mut send) = client
            .send_request(request, false)
            .map_err(|e| e.to_string())?;
        send.send_data(self.body.clone(), true)
            .map_err(|e| e.to_string())?;
        let response = response.await.map_err(|e| e.to_string())?;
        let (head, mut body) = response.into_parts();
        let mut grpc_status = head
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        if let Some(trailers) = body.trailers().await.map_err(|e| e.to_string())? {
            if let Some(status) = trailers.get("grpc-status").and_then(|v| v.to_str().ok()) {
                grpc_status = Some(status.to_string());
            }
        }
        Ok(Outcome {
            status: head.status.as_u16(),
            grpc_status,
        })
    }
}

/// An h2c connection to Envoy, prior knowledge; its connection task is spawned on the
/// current runtime.
async fn connect(port: u16) -> Result<SendRequest<Bytes>, String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (client, connection) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// One call on a connection of its own (the readiness check).
pub fn call_once(call: &Call) -> Result<Outcome, String> {
    let prepared = Prepared::new(call)?;
    runtime()
        .map_err(|e| e.to_string())?
        .block_on(async { prepared.call(connect(call.proxy_port).await?).await })
}

/// `connections` h2c connections, warmed up, waiting for [`Load::run`].
pub struct Load {
    runtime: Runtime,
    clients: Vec<SendRequest<Bytes>>,
    streams: usize,
    prepared: Arc<Prepared>,
}

impl Load {
    /// Opens `connections` connections and makes `warmup` calls on each, one after
    /// the other; each will carry `streams` concurrent calls in [`Load::run`].
    pub fn open(
        call: &Call,
        connections: usize,
        streams: usize,
        warmup: usize,
    ) -> Result<Load, String> {
        let runtime = runtime().map_err(|e| e.to_string())?;
        let prepared = Arc::new(Prepared::new(call)?);
        let clients = runtime.block_on(async {
            let mut clients = Vec::with_capacity(connections);
            for _ in 0..connections {
                let client = connect(call.proxy_port).await?;
                for _ in 0..warmup {
                    let outcome = prepared.call(client.clone()).await?;
                    if !outcome.ok() {
                        return Err(format!(
                            "warm-up call: {} grpc-status {}",
                            outcome.status,
                            outcome.grpc_status.as_deref().unwrap_or("none")
                        ));
                    }
                }
                clients.push(client);
            }
            Ok::<_, String>(clients)
        })?;
        Ok(Load {
            runtime,
            clients,
            streams: streams.max(1),
            prepared,
        })
    }

    /// Closed-loop calls on every stream of every connection for `duration`; a call is
    /// counted when it ended within the window.
    pub fn run(self, duration: Duration) -> Result<Run, String> {
        let Load {
            runtime,
            clients,
            streams,
            prepared,
        } = self;
        let start = Instant::now();
        let deadline = start + duration;
        let (latencies, not_ok, errors) = runtime.block_on(async {
            let mut tasks = Vec::with_capacity(clients.len() * streams);
            for client in &clients {
                for _ in 0..streams {
                    let (client, prepared) = (client.clone(), prepared.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut latencies = Vec::with_capacity(100_000);
                        let (mut not_ok, mut errors) = (0u64, 0u64);
                        loop {
                            let sent = Instant::now();
                            let outcome = prepared.call(client.clone()).await;
                            if Instant::now() > deadline {
                                break;
                            }
                            latencies.push(
                                u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX),
                            );
                            match outcome {
                                Ok(outcome) if outcome.ok() => {}
                                Ok(_) => not_ok += 1,
                                Err(_) => {
                                    errors += 1;
                                    // A dead connection fails every call at once.
                                    if client.clone().ready().await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        (latencies, not_ok, errors)
                    }));
                }
            }
            let (mut all, mut not_ok, mut errors) = (Vec::new(), 0, 0);
            for task in tasks {
                let (latencies, n, e) = task.await.map_err(|_| "a call task died")?;
                all.extend(latencies);
                not_ok += n;
                errors += e;
            }
            Ok::<_, String>((all, not_ok, errors))
        })?;
        Ok(Run::of_latencies(
            latencies,
            duration.as_secs_f64(),
            not_ok,
            errors,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_the_flag_the_big_endian_length_and_the_payload() {
        assert_eq!(&message(b"ok")[..], ANSWER);
        let framed = message(PAYLOAD);
        assert_eq!(framed.len(), 5 + PAYLOAD.len());
        assert_eq!(&framed[1..5], &(PAYLOAD.len() as u32).to_be_bytes());
    }

    /// The pair end to end without Envoy: the load's calls straight to the upstream
    /// (it takes any `:authority`), each counted with or without the credential.
    #[test]
    fn the_upstream_answers_every_call_ok_and_counts_the_credential() {
        let upstream = upstream("authorization: Bearer sk_test").expect("upstream");
        let call = Call {
            proxy_port: upstream.port,
            authority: format!("localhost:{}", upstream.port),
            proxy_authorization: "Basic dGVzdA==".into(),
        };
        assert!(call_once(&call).expect("one call").ok());
        let load = Load::open(&call, 2, 3, 2).expect("open");
        let run = load.run(Duration::from_millis(300)).expect("run");
        assert!(run.requests > 0);
        assert_eq!((run.non_2xx, run.socket_errors), (0, 0));
        let seen = upstream.counts();
        assert!(seen.requests >= run.requests + 5);
        assert_eq!(seen.with_credential, 0, "nothing injected it");
        assert_eq!(seen.with_proxy_authorization, seen.requests);
    }
}
