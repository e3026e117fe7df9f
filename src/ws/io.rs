//! The byte stream under a session's WebSocket.
//!
//! tungstenite reads client frames and writes control frames (pong, ping,
//! close) through this adaptor; the session writes its text frames here
//! itself, with [`FrameIo::push_text`]. Writes of either kind only append
//! to one in-memory buffer, in order, and a flush hands the whole buffer to
//! the socket — so a backlog of frames leaves in one system call, the
//! shared payload bytes are copied once per recipient without an
//! intermediate frame, and the buffer is given back once it is empty.
//!
//! That last point is what keeps idle connections small: tungstenite's own
//! write buffer keeps the capacity of the largest burst it ever gathered
//! (the `ready` frame with a room's presence list, a room's `join` storm),
//! for the life of the connection. Here a connection holds write memory
//! only while it has something to write. Frames the hub writes at once
//! ([`FrameIo::write_texts`]) are laid out in a buffer the thread keeps,
//! so they cost the connection an allocation only when the socket does
//! not take them whole.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::{
    FrameHeader,
    coding::{Data, OpCode},
};

pub struct FrameIo<S> {
    inner: S,
    /// Bytes not yet taken by the socket, from `written` on.
    out: Vec<u8>,
    written: usize,
}

impl<S> FrameIo<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            out: Vec::new(),
            written: 0,
        }
    }

    /// Whether bytes written to it have not all reached the socket yet.
    pub fn owes(&self) -> bool {
        !self.out.is_empty()
    }

    /// Queues one complete server text frame carrying `payload` (final,
    /// unmasked as from a server). Nothing reaches the socket before the
    /// next flush.
    pub fn push_text(&mut self, payload: &[u8]) {
        encode_text(&mut self.out, payload);
    }
}

/// Appends one complete server text frame carrying `payload` (final,
/// unmasked as from a server) to `out`.
fn encode_text(out: &mut Vec<u8>, payload: &[u8]) {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    let length = payload.len() as u64;
    out.reserve(header.len(length) + payload.len());
    header
        .format(length, out)
        .expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
}

/// Writes `buf` from `*written` on to `inner` until the socket has taken
/// all of it, counting what it took in `written`.
fn poll_write_from<S: AsyncWrite + Unpin>(
    inner: &mut S,
    buf: &[u8],
    written: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while *written < buf.len() {
        let n = ready!(Pin::new(&mut *inner).poll_write(cx, &buf[*written..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *written += n;
    }
    Poll::Ready(Ok(()))
}

thread_local! {
    /// Where [`FrameIo::write_texts`] lays out its frames: one buffer per
    /// thread, used by one write at a time and kept, so a write the socket
    /// takes whole allocates nothing.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most [`SCRATCH`] keeps between writes.
const SCRATCH_KEPT: usize = 64 << 10;

impl<S: AsyncWrite + Unpin> FrameIo<S> {
    /// Writes `payloads` as text frames (see [`Self::push_text`]) to the
    /// socket now, in one write, and flushes it; for a caller that has
    /// checked nothing is owed ([`Self::owes`]). The frames are laid out in
    /// this thread's scratch buffer, so the connection holds no buffer of
    /// its own unless the socket does not take them whole: what it leaves
    /// is kept for the next flush. True if everything reached the socket.
    pub fn write_texts(
        &mut self,
        payloads: &mut dyn Iterator<Item = &[u8]>,
        cx: &mut Context<'_>,
    ) -> bool {
        debug_assert!(!self.owes(), "bytes owed go first");
        let whole = SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            payloads.for_each(|payload| encode_text(scratch, payload));
            let mut written = 0;
            let whole = matches!(
                poll_write_from(&mut self.inner, scratch, &mut written, cx),
                Poll::Ready(Ok(()))
            );
            // Full, closed or failed: the flush that comes next writes the
            // rest or meets the error.
            self.out.extend_from_slice(&scratch[written..]);
            scratch.clear();
            scratch.shrink_to(SCRATCH_KEPT);
            whole
        });
        whole
            && matches!(
                Pin::new(&mut self.inner).poll_flush(cx),
                Poll::Ready(Ok(()))
            )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameIo<S> {
    /// Always takes everything: tungstenite then never holds half a frame,
    /// so its frames and the session's stay whole and in order. What is
    /// buffered is bounded by what the session writes between flushes.
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(poll_write_from(
            &mut this.inner,
            &this.out,
            &mut this.written,
            cx
        ))?;
        if !this.out.is_empty() {
            this.out = Vec::new();
            this.written = 0;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn noop_cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    /// Reads what the client side got so far.
    async fn drain(client: &mut tokio::io::DuplexStream, bytes: usize) -> Vec<u8> {
        let mut got = vec![0; bytes];
        client.read_exact(&mut got).await.expect("read");
        got
    }

    #[tokio::test]
    async fn frames_written_at_once_leave_no_buffer_behind() {
        let (server, mut client) = tokio::io::duplex(1 << 10);
        let mut io = FrameIo::new(server);
        let mut frames = [b"one".as_slice(), b"two".as_slice()].into_iter();
        assert!(io.write_texts(&mut frames, &mut noop_cx()));
        assert!(!io.owes());
        assert_eq!(io.out.capacity(), 0, "no buffer of the connection's own");
        assert_eq!(drain(&mut client, 10).await, b"\x81\x03one\x81\x03two");
    }

    #[tokio::test]
    async fn what_the_socket_does_not_take_is_kept_for_the_flush_in_order() {
        let (server, mut client) = tokio::io::duplex(4);
        let mut io = FrameIo::new(server);
        let mut frames = [b"one".as_slice(), b"two".as_slice()].into_iter();
        assert!(!io.write_texts(&mut frames, &mut noop_cx()));
        assert!(io.owes(), "six bytes left for the flush");
        io.push_text(b"3");
        let reader = tokio::spawn(async move { drain(&mut client, 13).await });
        io.flush().await.expect("flush");
        assert!(!io.owes());
        assert_eq!(reader.await.unwrap(), b"\x81\x03one\x81\x03two\x81\x013");
    }

    #[tokio::test]
    async fn a_large_write_does_not_leave_the_thread_a_large_buffer() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut io = FrameIo::new(server);
        let large = vec![b'x'; 3 * SCRATCH_KEPT];
        assert!(io.write_texts(&mut [large.as_slice()].into_iter(), &mut noop_cx()));
        assert!(SCRATCH.with_borrow(Vec::capacity) <= SCRATCH_KEPT);
        let got = drain(&mut client, large.len() + 10).await;
        assert_eq!(got[10..], large[..]);
    }

    /// Frames pushed and bytes written arrive whole, in order, on flush;
    /// lengths use the 7-bit, 16-bit and 64-bit forms at their bounds.
    #[tokio::test]
    async fn frames_leave_in_order_with_the_right_length_form() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut io = FrameIo::new(server);
        let sizes = [0usize, 125, 126, 65_535, 65_536];
        for size in sizes {
            io.push_text(&vec![b'x'; size]);
        }
        io.write_all(b"\x89\x00").await.expect("a ping frame");
        io.push_text(b"last");
        io.flush().await.expect("flush");
        assert_eq!(io.out.capacity(), 0, "the buffer is given back");

        let mut got = Vec::new();
        drop(io);
        client.read_to_end(&mut got).await.expect("read");
        let mut at = 0;
        let mut next = |got: &[u8]| -> (u8, Vec<u8>) {
            let op = got[at];
            let (len, header) = match got[at + 1] {
                126 => (u16::from_be_bytes([got[at + 2], got[at + 3]]) as usize, 4),
                127 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&got[at + 2..at + 10]);
                    (u64::from_be_bytes(b) as usize, 10)
                }
                short => (short as usize, 2),
            };
            let payload = got[at + header..at + header + len].to_vec();
            at += header + len;
            (op, payload)
        };
        for size in sizes {
            let (op, payload) = next(&got);
            assert_eq!(op, 0x81);
            assert_eq!(payload.len(), size);
        }
        assert_eq!(next(&got), (0x89, Vec::new()));
        assert_eq!(next(&got), (0x81, b"last".to_vec()));
        assert_eq!(at, got.len());
    }
}
