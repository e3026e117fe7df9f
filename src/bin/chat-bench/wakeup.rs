//! What waking a thread that sleeps on another CPU costs the waker, part of
//! `loopback`'s calibration.
//!
//! On loopback the server's write wakes the generator's reader inside the
//! server's own system call. Where the reader's CPU has gone idle, a VM
//! guest halts it, and the wake-up then sends it an interrupt through the
//! hypervisor, which the waker waits for: 7–12 µs on the thirty-fifth VM,
//! more than the rest of a small frame's write (docs/benchmarks.md). The
//! guest's halt polling (`guest_halt_poll_ns`) makes an idle CPU poll a
//! while before it halts, which takes most of that away.
//!
//! Measured with two threads pinned to the two CPUs and a byte written
//! to a socket pair every [`GAP`] (long enough for the reader's CPU to go
//! idle): the writer's own CPU time around each write while the reader
//! blocks on the socket, against the same while the reader polls it and
//! never sleeps. The difference is the wake-up.

use std::{
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use serde_json::json;

use anyhow::Context;

use crate::{
    cores::pin,
    loopback::{join_both, thread_cpu},
};

/// Between two writes: time for the reader to go back to sleep and for
/// its idle CPU to halt.
const GAP: Duration = Duration::from_micros(200);

/// Writes in each of the two runs.
const WRITES: u32 = 2_000;

/// The writer's CPU per write with the reader blocked and with it
/// polling, and their difference, in µs; `null` when both threads would
/// share one CPU (there is no other CPU to wake).
pub fn measure(writer_cpu: usize, reader_cpu: usize) -> anyhow::Result<serde_json::Value> {
    if writer_cpu == reader_cpu {
        return Ok(serde_json::Value::Null);
    }
    let blocked = writer_cpu_per_write(writer_cpu, reader_cpu, false)?;
    let polling = writer_cpu_per_write(writer_cpu, reader_cpu, true)?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Ok(json!({
        "writes": WRITES,
        "gap_us": GAP.as_micros() as u64,
        "blocked_reader_us_per_write": us(blocked),
        "polling_reader_us_per_write": us(polling),
        "wakeup_us": us(blocked.saturating_sub(polling)),
    }))
}

/// The writer's mean CPU time per one-byte write to a reader on
/// `reader_cpu`, which blocks on the socket or (`poll`) spins on it.
fn writer_cpu_per_write(
    writer_cpu: usize,
    reader_cpu: usize,
    poll: bool,
) -> anyhow::Result<Duration> {
    let (mut writer, mut reader) = UnixStream::pair()?;
    reader.set_nonblocking(poll)?;
    let reading = std::thread::spawn(move || -> anyhow::Result<()> {
        pin(reader_cpu)?;
        let mut buf = [0u8; 64];
        let mut left = u64::from(WRITES);
        while left > 0 {
            match reader.read(&mut buf) {
                Ok(0) => anyhow::bail!("the writer left with {left} bytes unsent"),
                Ok(got) => left = left.saturating_sub(got as u64),
                Err(err)
                    if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    });
    let writing = std::thread::spawn(move || -> anyhow::Result<Duration> {
        pin(writer_cpu)?;
        let mut spent = Duration::ZERO;
        for _ in 0..WRITES {
            let before = thread_cpu();
            writer.write_all(b"x")?;
            spent += thread_cpu() - before;
            // A busy wait: a sleep would let the writer's CPU halt too.
            let until = Instant::now() + GAP;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        Ok(spent / WRITES)
    });
    let (spent, ()) = join_both(writing, reading).context("pricing a wake-up")?;
    Ok(spent)
}
