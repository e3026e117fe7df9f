//! When the bytes the generator reads reached its socket.
//!
//! Every latency the tool reports is stamped when one of its tasks reads the
//! frame, so it includes however long the generator's own event loop took
//! to get to that socket: with 10,000 connections on one thread sharing a
//! core with the database and Redis, tens of milliseconds in a busy spell
//! (`generator_loop_lag`). A client on a machine of its own reads at once.
//! [`Stamped`] asks the kernel to stamp each arriving segment
//! (`SO_TIMESTAMPNS`) and keeps the stamp of the newest data each read
//! returned, so the tool can report a second latency that ends when the
//! frame reached the client's socket rather than when the tool read it.
//!
//! The stamp of a read is that of the last segment it took: a frame that
//! arrived earlier in the same read is charged the later arrival, so an
//! arrival latency is never below the true one, and never above the one
//! stamped at the read.
//!
//! The kernel turns its receive stamps on a moment after the first socket
//! on the machine asks for them (deferred work); bytes that arrive unstamped
//! take their read's time. A run's connections are all open, and their
//! `ready` frames read, before anything is measured.

use std::{
    io::{self, IoSliceMut, Write},
    net::Shutdown,
    os::fd::{AsFd, AsRawFd, RawFd},
    pin::Pin,
    task::{Context, Poll, ready},
};

use nix::sys::{
    socket::{self, ControlMessageOwned, MsgFlags, sockopt},
    time::TimeSpec,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, unix::AsyncFd};

/// A TCP stream that knows when what it last read arrived.
///
/// Read through `recvmsg` on the socket itself (tokio's `TcpStream` reads
/// with `recv`, which gives no control messages), registered with the
/// runtime as an [`AsyncFd`].
pub struct Stamped {
    inner: AsyncFd<std::net::TcpStream>,
    /// Room for one `SCM_TIMESTAMPNS` control message, reused by each
    /// read; empty when not stamping.
    control: Vec<u8>,
    /// µs since the epoch: when the newest byte read so far arrived.
    arrived_us: u64,
}

impl Stamped {
    /// Connects to `host` (`address:port`), Nagle off as a real client
    /// would have it, with the kernel's receive timestamps on if `stamp`
    /// (without, reads cost what tokio's own do).
    pub async fn connect(host: &str, stamp: bool) -> io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        let stream = stream.into_std()?;
        if stamp {
            socket::setsockopt(&stream.as_fd(), sockopt::ReceiveTimestampns, &true)?;
        }
        // SAFETY: the stream owns its descriptor, which stays open and the
        // same for as long as the `AsyncFd` owns the stream.
        let inner = unsafe { AsyncFd::register(stream) }?;
        Ok(Self {
            inner,
            control: if stamp {
                nix::cmsg_space!(TimeSpec)
            } else {
                Vec::new()
            },
            arrived_us: 0,
        })
    }

    /// When the newest byte read so far reached the socket, in µs since
    /// the epoch; `None` when not stamping (or before the first read).
    pub fn arrived_us(&self) -> Option<u64> {
        (!self.control.is_empty() && self.arrived_us > 0).then_some(self.arrived_us)
    }
}

/// One read into `buf`: the bytes read and, when the kernel sent one, the
/// arrival stamp of the newest of them. Without room for a control message,
/// a plain `recv`.
fn receive(fd: RawFd, control: &mut [u8], buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    if control.is_empty() {
        return Ok((socket::recv(fd, buf, MsgFlags::empty())?, None));
    }
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(fd, &mut iov, Some(control), MsgFlags::empty())?;
    let stamp = msg.cmsgs()?.find_map(|cmsg| match cmsg {
        ControlMessageOwned::ScmTimestampns(at) => Some(micros(&at)),
        _ => None,
    });
    Ok((msg.bytes, stamp))
}

fn micros(at: &TimeSpec) -> u64 {
    (at.tv_sec() as u64) * 1_000_000 + (at.tv_nsec() as u64) / 1_000
}

impl AsyncRead for Stamped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Self {
            inner,
            control,
            arrived_us,
        } = self.get_mut();
        loop {
            let mut guard = ready!(inner.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let wanted = unfilled.len();
            // A read that would block clears the readiness and waits again.
            let Ok(received) = guard.try_io(|fd| receive(fd.as_raw_fd(), control, unfilled)) else {
                continue;
            };
            let (n, stamp) = received?;
            if n < wanted {
                // The socket is drained (as tokio's own reads assume): wait
                // for the next readiness instead of asking again at once.
                guard.clear_ready();
            }
            if n > 0 && !control.is_empty() {
                // Without a stamp (data queued before the option took
                // effect), the read's own time.
                *arrived_us = stamp.unwrap_or_else(crate::unix_micros);
            }
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for Stamped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.inner.poll_write_ready(cx))?;
            if let Ok(written) = guard.try_io(|fd| fd.get_ref().write(buf)) {
                return Poll::Ready(written);
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.get_ref().shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::unix_micros;

    /// A connected pair on loopback: the stream under test and its peer.
    async fn pair(stamp: bool) -> (Stamped, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("address").to_string();
        let (stamped, accepted) = tokio::join!(Stamped::connect(&host, stamp), listener.accept());
        (stamped.expect("connect"), accepted.expect("accept").0)
    }

    /// Bytes read 60 ms after they were written carry the time they were
    /// written, not the time they were read.
    #[tokio::test]
    async fn bytes_read_late_carry_the_time_they_arrived() {
        let (mut stamped, mut peer) = pair(true).await;
        let mut buf = [0u8; 64];
        // The kernel turns stamping on a moment after the first socket on
        // the machine asks for it: until then bytes come unstamped (and
        // take their read's time). Wait for one stamped at its write.
        for attempt in 0.. {
            peer.write_all(b".").await.expect("write");
            let after_write = unix_micros();
            stamped.read_exact(&mut buf[..1]).await.expect("read");
            if stamped.arrived_us().is_some_and(|at| at <= after_write + 1) {
                break;
            }
            assert!(attempt < 100, "no arrival stamped in a second");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before_write = unix_micros();
        peer.write_all(b"hello").await.expect("write");
        let after_write = unix_micros();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let n = stamped.read(&mut buf).await.expect("read");
        let read_at = unix_micros();
        assert_eq!(&buf[..n], b"hello");
        let arrived = stamped.arrived_us().expect("a stamp");
        assert!(
            (before_write..=after_write + 1).contains(&arrived),
            "arrived at {arrived}, written between {before_write} and {after_write}"
        );
        assert!(
            read_at - arrived >= 55_000,
            "read {} µs after",
            read_at - arrived
        );

        // The peer's next bytes move the stamp on; writes go through.
        peer.write_all(b"again").await.expect("write");
        let n = stamped.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"again");
        assert!(stamped.arrived_us().expect("a stamp") > arrived);
        stamped.write_all(b"back").await.expect("write back");
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"back");
    }

    /// Without stamping the stream reads and writes as usual and claims no
    /// arrival time; its end is seen as the end.
    #[tokio::test]
    async fn an_unstamped_stream_reads_writes_and_claims_no_arrival() {
        let (mut stamped, mut peer) = pair(false).await;
        peer.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 64];
        let n = stamped.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(stamped.arrived_us(), None);
        stamped.write_all(b"back").await.expect("write back");
        stamped.shutdown().await.expect("shutdown");
        let mut back = Vec::new();
        peer.read_to_end(&mut back).await.expect("read back");
        assert_eq!(back, b"back");
        drop(peer);
        assert_eq!(stamped.read(&mut buf).await.expect("read the end"), 0);
    }
}
