//! How the service takes TCP connections: Nagle's algorithm off, and a
//! deadline for every request head.
//!
//! A client that connects and then sends its request line and headers
//! slowly, or not at all, holds a socket and a file descriptor for as long
//! as it likes; enough of them (a "slowloris") use up the process's
//! descriptors and no one else can connect. So each connection must deliver
//! the end of its first request head (the empty line after the headers)
//! within `REQUEST_HEADER_TIMEOUT` of being accepted, and each later head on
//! a keep-alive connection within `KEEP_ALIVE_TIMEOUT` of the previous
//! response's start, or it is closed: otherwise one cheap request would buy
//! an idle connection for ever. The deadlines watch only the bytes of a
//! head, and the start of each response; a connection upgraded to a
//! WebSocket (a `101` response) or speaking HTTP/2 passes through from then
//! on, so a chat connection's frames cost one branch and no timer.

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

/// Accepts TCP connections with Nagle's algorithm off, each under
/// deadlines for its request heads. Nagle is off because chat frames
/// are small and each must leave at once: with it on, a frame written
/// while the previous one is unacknowledged waits for the peer's delayed
/// ACK (up to 40 ms on Linux) — measured as a 40 ms floor under every `ack`
/// in a busy room.
pub struct ChatAcceptor {
    tcp: TcpAcceptor,
    timeouts: HeadTimeouts,
}

impl ChatAcceptor {
    pub fn new(tcp: TcpAcceptor, timeouts: HeadTimeouts) -> Self {
        Self { tcp, timeouts }
    }
}

/// How long a connection may take over a request head (zero: no limit).
#[derive(Clone, Copy, Debug)]
pub struct HeadTimeouts {
    /// From accepting the connection to the end of its first head.
    pub first: Duration,
    /// From the start of a response to the end of the next head: how long
    /// an idle keep-alive connection is kept.
    pub keep_alive: Duration,
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
            HeadDeadline::new(stream, self.timeouts),
            local,
            remote,
            scheme,
        ))
    }
}

/// A stream whose reads fail with `TimedOut` when a request head has not
/// ended by its deadline.
pub struct HeadDeadline<S> {
    inner: S,
    phase: Phase,
    /// Wakes a read waiting for the rest of a head at its deadline. Made
    /// only when a read has to wait (a client's first head usually arrives
    /// with its connection: 87 timers for 19,000 connections in the idle
    /// benchmark, so the accept path saves an allocation and a timer
    /// registration for the others) or a keep-alive deadline starts; reused
    /// for every later head, dropped once no head follows.
    timer: Option<Pin<Box<Sleep>>>,
    /// [`HeadTimeouts::keep_alive`] in milliseconds, for the heads after
    /// the first (a quarter of `Duration`'s size: every open connection
    /// keeps it).
    keep_alive_ms: u32,
}

enum Phase {
    /// Reading a request head, which must end by `deadline`. `first`: the
    /// connection's first.
    Head {
        deadline: Instant,
        end: HeadEnd,
        first: bool,
    },
    /// The head has ended and its response has not begun: no deadline.
    Answering,
    /// No more heads to time: upgraded, HTTP/2, or no limit.
    Through,
}

impl<S> HeadDeadline<S> {
    pub fn new(inner: S, timeouts: HeadTimeouts) -> Self {
        let phase = if !timeouts.first.is_zero() {
            Phase::Head {
                deadline: Instant::now() + timeouts.first,
                end: HeadEnd::default(),
                first: true,
            }
        } else if !timeouts.keep_alive.is_zero() {
            Phase::Answering
        } else {
            Phase::Through
        };
        Self {
            inner,
            phase,
            timer: None,
            keep_alive_ms: u32::try_from(timeouts.keep_alive.as_millis()).unwrap_or(u32::MAX),
        }
    }

    /// True between a head's end and its response's first write: only
    /// then do writes need a look (one branch on every other write, a
    /// WebSocket's included).
    fn answering(&self) -> bool {
        matches!(self.phase, Phase::Answering)
    }

    /// Called, while [`answering`](Self::answering), with the first bytes
    /// of a write: the start of a response ends the `Answering` phase. When
    /// a keep-alive deadline starts, its timer is registered with the
    /// writing task at once: the connection's read may already be waiting
    /// on the socket, and would not look at the deadline until the client
    /// sent something.
    fn writing(&mut self, bytes: &[u8], cx: &mut Context<'_>) {
        if bytes.is_empty() {
            return;
        }
        // An HTTP/1 status line: "HTTP/1.1 200 OK", the code at 9..12.
        let status = bytes
            .starts_with(b"HTTP/1.")
            .then(|| bytes.get(9..12))
            .flatten();
        self.phase = match status {
            // Interim (100 Continue): the final response is still to come.
            Some([b'1', rest @ ..]) if rest != b"01" => Phase::Answering,
            // A WebSocket from now on, or not HTTP/1 at all (HTTP/2).
            Some(b"101") | None => Phase::Through,
            Some(_) if self.keep_alive_ms == 0 => Phase::Through,
            Some(_) => {
                let deadline = Instant::now() + Duration::from_millis(self.keep_alive_ms.into());
                // Pending: the deadline is ahead.
                let _ = wait_until(&mut self.timer, deadline, cx);
                Phase::Head {
                    deadline,
                    end: HeadEnd::default(),
                    first: false,
                }
            }
        };
        // Kept while heads may follow (a keep-alive connection moves one
        // timer from head to head); a WebSocket's goes here.
        if matches!(self.phase, Phase::Through) {
            self.timer = None;
        }
    }
}

/// Polls the connection's timer for `deadline`, making it or moving it
/// there first: Pending registers `cx`'s task to be woken at the deadline.
fn wait_until(
    timer: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    // A timer made for an earlier head is moved to this one's.
    if timer.deadline() != deadline {
        timer.as_mut().reset(deadline);
    }
    timer.as_mut().poll(cx)
}

/// The error that closes a connection whose head is late. A first head, or
/// a later one of which some bytes came, is counted: a client too slow to
/// send a request. A keep-alive connection that stayed idle is not.
fn too_slow(counted: bool) -> io::Error {
    if counted {
        metrics::counter!("chat_http_header_timeouts_total").increment(1);
        tracing::debug!("closing a connection that did not finish a request head in time");
    } else {
        tracing::debug!("closing an idle keep-alive connection");
    }
    io::Error::new(io::ErrorKind::TimedOut, "request head not received in time")
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Phase::Head {
            deadline,
            end,
            first,
        } = &mut this.phase
        else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if end.complete_in(&buf.filled()[before..]) {
                    this.phase = Phase::Answering;
                } else if Instant::now() >= *deadline {
                    // Still in the head, a byte at a time past the deadline.
                    buf.set_filled(before);
                    return Poll::Ready(Err(too_slow(*first || end.started)));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => wait_until(&mut this.timer, *deadline, cx)
                .map(|()| Err(too_slow(*first || end.started))),
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
        if self.answering() {
            self.writing(buf, cx);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.answering() {
            if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
                self.writing(first, cx);
            }
        }
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
/// An HTTP/2 client's preface holds such a line as well, so its "head" ends
/// at once, and the server's first write, not HTTP/1, lets the connection
/// through.
#[derive(Default)]
struct HeadEnd {
    /// The bytes since the last line feed were at most a carriage return.
    at_line_start: bool,
    /// Some of the head has come.
    started: bool,
}

impl HeadEnd {
    /// Takes the next bytes read; true once the head has ended.
    fn complete_in(&mut self, bytes: &[u8]) -> bool {
        self.started |= !bytes.is_empty();
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

    const LIMIT: Duration = Duration::from_millis(300);

    async fn listener(
        first: Duration,
        keep_alive: Duration,
    ) -> (ChatAcceptor, std::net::SocketAddr) {
        let tcp = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .expect("a listener");
        let addr = *tcp.local_addr()[0]
            .as_socket_addr()
            .expect("a socket address");
        let timeouts = HeadTimeouts { first, keep_alive };
        (ChatAcceptor::new(tcp, timeouts), addr)
    }

    /// An accepted connection and the client's end of it.
    async fn pair(
        listener: &mut ChatAcceptor,
        addr: std::net::SocketAddr,
    ) -> (HeadDeadline<TcpStream>, TcpStream) {
        let (accepted, client) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        (accepted.expect("accepted").0, client.expect("connected"))
    }

    /// Reads one whole request head from the client.
    async fn read_head(server: &mut HeadDeadline<TcpStream>, client: &mut TcpStream) {
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: chat\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 64];
        while !head.ends_with(b"\r\n\r\n") {
            let n = server.read(&mut buf).await.expect("the head is read");
            head.extend_from_slice(&buf[..n]);
        }
    }

    /// The server's next read: its error kind, or the bytes it got.
    async fn next_read(server: &mut HeadDeadline<TcpStream>) -> Result<Vec<u8>, io::ErrorKind> {
        let mut buf = [0u8; 64];
        match server.read(&mut buf).await {
            Ok(n) => Ok(buf[..n].to_vec()),
            Err(err) => Err(err.kind()),
        }
    }

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let (mut listener, addr) = listener(LIMIT, LIMIT).await;
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
        assert!(!partial.started);
        assert!(!partial.complete_in(b"GET / HTTP/1.1\r\nHost: chat\r\nX-Slow: a\r\n"));
        assert!(partial.started);
        assert!(!partial.complete_in(b"X-Slower: b\r\n\r"));
        assert!(partial.complete_in(b"\n"));
    }

    /// Silent past the deadline: the server's read fails. A head that ends
    /// in time lifts the deadline until its response begins.
    #[tokio::test]
    async fn a_connection_must_finish_its_first_head_in_time() {
        let (mut listener, addr) = listener(LIMIT, LIMIT).await;

        // Before the accept, which starts the deadline.
        let started = tokio::time::Instant::now();
        let (mut silent, _client) = pair(&mut listener, addr).await;
        assert_eq!(next_read(&mut silent).await, Err(io::ErrorKind::TimedOut));
        assert!(started.elapsed() >= LIMIT);

        let (mut prompt, mut client) = pair(&mut listener, addr).await;
        read_head(&mut prompt, &mut client).await;
        // A slow handler: no deadline while the response has not begun.
        tokio::time::sleep(LIMIT * 2).await;
        client.write_all(b"body").await.unwrap();
        assert_eq!(next_read(&mut prompt).await, Ok(b"body".to_vec()));
    }

    /// Bytes that keep coming do not extend the deadline: a head still
    /// unfinished when it passes fails the next read.
    #[tokio::test]
    async fn a_head_trickling_in_is_cut_off_at_the_deadline() {
        let (mut listener, addr) = listener(LIMIT, LIMIT).await;
        let started = tokio::time::Instant::now();
        let (mut slow, mut client) = pair(&mut listener, addr).await;
        let trickle = tokio::spawn(async move {
            client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if client.write_all(b"X-Slow: yes\r\n").await.is_err() {
                    break;
                }
            }
        });
        let err = loop {
            match next_read(&mut slow).await {
                Ok(bytes) => assert!(!bytes.is_empty(), "the client does not close"),
                Err(kind) => break kind,
            }
        };
        assert_eq!(err, io::ErrorKind::TimedOut);
        let elapsed = started.elapsed();
        assert!(elapsed >= LIMIT && elapsed < LIMIT * 3, "{elapsed:?}");
        trickle.abort();
    }

    /// After a response begins, the next head has the keep-alive limit; an
    /// interim `100 Continue` is not the response. As in the HTTP server,
    /// the connection's read is already waiting on the socket when the
    /// response is written, in the same task: the deadline must wake it.
    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_its_limit() {
        let keep_alive = Duration::from_millis(600);
        let (mut listener, addr) = listener(Duration::from_secs(60), keep_alive).await;
        let (mut server, mut client) = pair(&mut listener, addr).await;
        read_head(&mut server, &mut client).await;
        server
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(keep_alive + LIMIT).await;
        assert!(matches!(server.phase, Phase::Answering));

        let started = tokio::time::Instant::now();
        let mut responded = false;
        let mut buf = [0u8; 64];
        let read = std::future::poll_fn(|cx| {
            let mut into = ReadBuf::new(&mut buf);
            let read = Pin::new(&mut server).poll_read(cx, &mut into);
            if responded {
                return read.map(|done| done.map(|()| into.filled().len()));
            }
            assert!(read.is_pending(), "the client sent nothing");
            let response = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            let wrote = Pin::new(&mut server).poll_write(cx, response);
            assert!(matches!(wrote, Poll::Ready(Ok(n)) if n == response.len()));
            responded = true;
            Poll::Pending
        });
        let read = tokio::time::timeout(keep_alive * 5, read)
            .await
            .expect("the deadline woke the waiting read");
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
        let elapsed = started.elapsed();
        assert!(
            elapsed >= keep_alive && elapsed < keep_alive * 3,
            "{elapsed:?}"
        );
    }

    /// A `101` response (a WebSocket from then on) or a first write that is
    /// not HTTP/1 (HTTP/2) ends the deadlines for good.
    #[tokio::test]
    async fn upgraded_and_http2_connections_have_no_deadline() {
        let (mut listener, addr) = listener(LIMIT, LIMIT).await;
        let responses: [&[u8]; 2] = [
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        ];
        for response in responses {
            let (mut server, mut client) = pair(&mut listener, addr).await;
            read_head(&mut server, &mut client).await;
            server.write_all(response).await.unwrap();
            tokio::time::sleep(LIMIT * 2).await;
            client.write_all(b"later").await.unwrap();
            assert_eq!(next_read(&mut server).await, Ok(b"later".to_vec()));
            assert!(matches!(server.phase, Phase::Through));
        }
    }

    #[tokio::test]
    async fn zero_limits_set_no_deadline() {
        let (mut listener, addr) = listener(Duration::ZERO, Duration::ZERO).await;
        let (mut stream, mut client) = pair(&mut listener, addr).await;
        assert!(matches!(stream.phase, Phase::Through));
        client.write_all(b"GET").await.unwrap();
        assert_eq!(next_read(&mut stream).await, Ok(b"GET".to_vec()));
    }
}
