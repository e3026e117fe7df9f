//! How the service takes TCP connections: Nagle's algorithm off, and a
//! deadline for each connection's first request head.
//!
//! A client that connects and then sends its request line and headers
//! slowly, or not at all, holds a socket and a file descriptor for as long
//! as it likes; enough of them (a "slowloris") use up the process's
//! descriptors and no one else can connect. Each accepted connection
//! therefore must deliver the end of its first request head (the empty
//! line after the headers) within `REQUEST_HEADER_TIMEOUT`, or it is
//! closed. The deadline watches only the bytes before that empty line:
//! once it has passed, reads go straight to the socket, so the requests
//! and WebSocket frames that follow (a chat connection lasts for hours)
//! cost one branch and no timer.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use poem::listener::{Acceptor, TcpAcceptor};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};

/// Accepts TCP connections with Nagle's algorithm off, each under a
/// deadline for its first request head. Nagle is off because chat frames
/// are small and each must leave at once: with it on, a frame written
/// while the previous one is unacknowledged waits for the peer's delayed
/// ACK (up to 40 ms on Linux) — measured as a 40 ms floor under every `ack`
/// in a busy room.
pub struct ChatAcceptor {
    tcp: TcpAcceptor,
    head_timeout: Duration,
}

impl ChatAcceptor {
    pub fn new(tcp: TcpAcceptor, head_timeout: Duration) -> Self {
        Self { tcp, head_timeout }
    }
}

impl Acceptor for ChatAcceptor {
    type Io = HeadDeadline<TcpStream>;

    fn local_addr(&self) -> Vec<poem::web::LocalAddr> {
        self.tcp.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> io::Result<(
        Self::Io,
        poem::web::LocalAddr,
        poem::web::RemoteAddr,
        poem::http::uri::Scheme,
    )> {
        let (stream, local, remote, scheme) = self.tcp.accept().await?;
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "could not turn Nagle's algorithm off");
        }
        Ok((
            HeadDeadline::new(stream, self.head_timeout),
            local,
            remote,
            scheme,
        ))
    }
}

/// A stream whose reads fail with `TimedOut` if the end of the first
/// request head has not been read by a deadline.
pub struct HeadDeadline<S> {
    inner: S,
    /// When the first head must have ended; `None` once it has (for good),
    /// or with no limit.
    deadline: Option<Instant>,
    /// Wakes a read waiting for the rest of the head at the deadline. Made
    /// only when a read has to wait: a client's head usually arrives with
    /// its connection (87 timers for 19,000 connections in the idle
    /// benchmark), and the accept path saves an allocation and a timer
    /// registration for the others.
    timer: Option<Pin<Box<Sleep>>>,
    head: HeadEnd,
}

impl<S> HeadDeadline<S> {
    /// `limit` of zero: no deadline.
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            deadline: (!limit.is_zero()).then(|| Instant::now() + limit),
            timer: None,
            head: HeadEnd::default(),
        }
    }
}

fn too_slow() -> io::Error {
    metrics::counter!("chat_http_header_timeouts_total").increment(1);
    tracing::debug!("closing a connection that did not finish its request head in time");
    io::Error::new(io::ErrorKind::TimedOut, "request head not received in time")
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(deadline) = this.deadline else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.head.complete_in(&buf.filled()[before..]) {
                    this.deadline = None;
                    this.timer = None;
                } else if Instant::now() >= deadline {
                    // Still in the head, a byte at a time past the deadline.
                    buf.set_filled(before);
                    return Poll::Ready(Err(too_slow()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(too_slow())),
                    Poll::Pending => Poll::Pending,
                }
            }
            failed => failed,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Finds the empty line that ends a request head, across reads: a line
/// feed that follows a line feed with nothing but a carriage return
/// between them (`\r\n\r\n`, or the bare `\n\n` that parsers accept too).
/// An HTTP/2 client's preface holds such a line as well, so it is let
/// through at once.
#[derive(Default)]
struct HeadEnd {
    /// The bytes since the last line feed were at most a carriage return.
    at_line_start: bool,
}

impl HeadEnd {
    /// Takes the next bytes read; true once the head has ended.
    fn complete_in(&mut self, bytes: &[u8]) -> bool {
        for &byte in bytes {
            match byte {
                b'\n' if self.at_line_start => return true,
                b'\n' => self.at_line_start = true,
                b'\r' => {}
                _ => self.at_line_start = false,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use poem::listener::{Listener as _, TcpListener};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn listener(head_timeout: Duration) -> (ChatAcceptor, std::net::SocketAddr) {
        let tcp = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .expect("a listener");
        let addr = *tcp.local_addr()[0]
            .as_socket_addr()
            .expect("a socket address");
        (ChatAcceptor::new(tcp, head_timeout), addr)
    }

    /// An accepted connection and the client's end of it.
    async fn pair(
        listener: &mut ChatAcceptor,
        addr: std::net::SocketAddr,
    ) -> (HeadDeadline<TcpStream>, TcpStream) {
        let (accepted, client) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        (accepted.expect("accepted").0, client.expect("connected"))
    }

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let (mut listener, addr) = listener(Duration::from_secs(10)).await;
        let (stream, _client) = pair(&mut listener, addr).await;
        assert!(stream.inner.nodelay().expect("the option reads"));
    }

    #[test]
    fn a_head_ends_at_its_empty_line_however_the_reads_split_it() {
        let head = b"GET /healthz HTTP/1.1\r\nHost: chat\r\n\r\n";
        for split in 0..head.len() {
            let mut end = HeadEnd::default();
            let (first, rest) = head.split_at(split);
            let found = end.complete_in(first) || end.complete_in(rest);
            assert!(found, "split at {split}");
        }
        let mut bare = HeadEnd::default();
        assert!(bare.complete_in(b"GET / HTTP/1.1\nHost: chat\n\n"));
        let mut partial = HeadEnd::default();
        assert!(!partial.complete_in(b"GET / HTTP/1.1\r\nHost: chat\r\nX-Slow: a\r\n"));
        assert!(!partial.complete_in(b"X-Slower: b\r\n\r"));
        assert!(partial.complete_in(b"\n"));
    }

    /// Silent past the deadline: the server's read fails. A head that ends
    /// in time lifts the deadline for good.
    #[tokio::test]
    async fn a_connection_must_finish_its_first_head_in_time_and_then_has_no_deadline() {
        let limit = Duration::from_millis(300);
        let (mut listener, addr) = listener(limit).await;

        let (mut silent, _client) = pair(&mut listener, addr).await;
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 64];
        let err = silent.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= limit);

        let (mut prompt, mut client) = pair(&mut listener, addr).await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let n = prompt.read(&mut buf).await.expect("the head is read");
            head.extend_from_slice(&buf[..n]);
        }
        tokio::time::sleep(limit * 2).await;
        client.write_all(b"later").await.unwrap();
        let n = prompt.read(&mut buf).await.expect("no deadline any more");
        assert_eq!(&buf[..n], b"later");
    }

    /// Bytes that keep coming do not extend the deadline: a head still
    /// unfinished when it passes fails the next read.
    #[tokio::test]
    async fn a_head_trickling_in_is_cut_off_at_the_deadline() {
        let limit = Duration::from_millis(300);
        let (mut listener, addr) = listener(limit).await;
        let (mut slow, mut client) = pair(&mut listener, addr).await;
        let started = tokio::time::Instant::now();
        let trickle = tokio::spawn(async move {
            client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if client.write_all(b"X-Slow: yes\r\n").await.is_err() {
                    break;
                }
            }
        });
        let mut buf = [0u8; 64];
        let err = loop {
            match slow.read(&mut buf).await {
                Ok(n) => assert!(n > 0, "the client does not close"),
                Err(err) => break err,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let elapsed = started.elapsed();
        assert!(elapsed >= limit && elapsed < limit * 3, "{elapsed:?}");
        trickle.abort();
    }

    #[tokio::test]
    async fn a_zero_limit_sets_no_deadline() {
        let (mut listener, addr) = listener(Duration::ZERO).await;
        let (mut stream, mut client) = pair(&mut listener, addr).await;
        assert!(stream.deadline.is_none());
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(stream.read(&mut buf).await.unwrap(), 3);
    }
}
