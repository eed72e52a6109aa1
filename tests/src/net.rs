//! Loopback servers and ports for tests: a free port to hand to a process that binds
//! it itself (Envoy), and an accept loop for the servers the kit runs in-process (the
//! echo upstreams on TCP, the fake control plane on a Unix socket).

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A loopback port that was free a moment ago. Another process may take it before
/// whoever it is for binds it: callers that can, retry with a new one.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A listener [`serve_loopback`] can run: TCP on loopback, or a Unix socket.
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;

    fn accept_stream(&self) -> std::io::Result<Self::Stream>;

    /// Connects to this listener once: how a blocked `accept` is woken to see that
    /// serving has stopped (std has no way to interrupt it).
    fn waker(&self) -> std::io::Result<Box<dyn Fn() + Send + Sync>>;
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    fn accept_stream(&self) -> std::io::Result<TcpStream> {
        self.accept().map(|(stream, _)| stream)
    }

    fn waker(&self) -> std::io::Result<Box<dyn Fn() + Send + Sync>> {
        let addr = self.local_addr()?;
        Ok(Box::new(move || {
            let _ = TcpStream::connect(addr);
        }))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    fn accept_stream(&self) -> std::io::Result<UnixStream> {
        self.accept().map(|(stream, _)| stream)
    }

    fn waker(&self) -> std::io::Result<Box<dyn Fn() + Send + Sync>> {
        let path = self
            .local_addr()?
            .as_pathname()
            .map(std::path::Path::to_path_buf)
            .ok_or_else(|| std::io::Error::other("an unnamed Unix socket"))?;
        Ok(Box::new(move || {
            let _ = UnixStream::connect(&path);
        }))
    }
}

/// Serves every connection `listener` accepts on a thread of its own with `handler`
/// (a test server needs no more, and a slow connection never holds up another) until
/// the returned [`Serving`] is dropped.
pub fn serve_loopback<L: Listener>(
    listener: L,
    handler: impl Fn(L::Stream) + Send + Sync + 'static,
) -> Serving {
    let stop = Arc::new(AtomicBool::new(false));
    let wake = listener.waker().expect("the listener's address");
    let handler = Arc::new(handler);
    {
        let stop = stop.clone();
        std::thread::spawn(move || loop {
            let stream = listener.accept_stream();
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else { continue };
            let handler = handler.clone();
            std::thread::spawn(move || handler(stream));
        });
    }
    Serving { stop, wake }
}

/// A running [`serve_loopback`]: stops accepting when dropped (connections already
/// accepted finish on their own).
pub struct Serving {
    stop: Arc<AtomicBool>,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        (self.wake)();
    }
}
