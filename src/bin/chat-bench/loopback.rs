//! `loopback`: what this machine's kernel charges for a delivery, with no
//! server at all.
//!
//! On a benchmark machine most of a fan-out's cost is not the service's: a
//! delivery is one `sendto` of a small frame on a loopback TCP connection,
//! and the kernel runs the receiving side of that connection (and wakes
//! its reader) inside the sender's call. What that costs differs between
//! VMs of the same size (the same build's target 4 took 59–64 % of the
//! server's core on one and 77–92 % on another, docs/benchmarks.md), so a
//! fan-out figure is read against it.
//!
//! This scenario does what a pod's fan-out does to the kernel and nothing
//! else: one thread (pinned where the server would be) writes a frame to
//! each of a room's connections in turn, room after room at a fixed rate,
//! with `TCP_NODELAY` as the service sets it; another (pinned where the
//! generator would be) reads them the way the generator's members do,
//! one edge-triggered `epoll` set and one read per readiness. Each
//! thread's own CPU time divided by the frames is the kernel's price per
//! delivery on each side; the writer's includes the loopback receive path
//! and the reader's wake-ups, as a pod's does.
//!
//! Then it prices one of those wake-ups on its own ([`crate::wakeup`]):
//! what waking a thread asleep on the reader's CPU costs the writer.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use nix::{
    sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout},
    time::{ClockId, clock_gettime},
};
use serde_json::json;

use crate::cores::{allowed_cpus, pin};

#[derive(Debug, clap::Args)]
pub struct LoopbackArgs {
    /// Connections, written to in turn like one room's members.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Frames per second, all connections together (target 4 delivers
    /// 100,000/s).
    #[arg(long, default_value_t = 100_000.0)]
    rate: f64,
    /// Bytes per frame (a chat `message` frame with its WebSocket header is
    /// about 200).
    #[arg(long, default_value_t = 200)]
    frame_bytes: usize,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The CPU the writer runs on (where the server would be).
    #[arg(long, default_value_t = 0)]
    writer_cpu: usize,
    /// The CPU the reader runs on (where the generator would be).
    #[arg(long, default_value_t = 1)]
    reader_cpu: usize,
}

impl LoopbackArgs {
    /// How many times every connection gets a frame.
    fn rounds(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64() / self.connections as f64).ceil() as u64
    }

    /// The frames written (and read) in all.
    fn frames(&self) -> u64 {
        self.rounds() * self.connections as u64
    }
}

/// The calling thread's CPU time so far.
pub fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Fails unless this process may run on `cpu` (`run` checks both threads'
/// CPUs before either starts).
fn allowed(cpu: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        allowed_cpus().contains(&cpu),
        "CPU {cpu} is not one this process may run on (see --writer-cpu, --reader-cpu)"
    );
    Ok(())
}

/// What a system call that does nothing costs here: every delivery pays
/// it at least once, on each side.
fn null_syscall_ns() -> f64 {
    const CALLS: u32 = 200_000;
    let started = Instant::now();
    for _ in 0..CALLS {
        // glibc does not cache the parent's pid: each call enters the kernel.
        std::hint::black_box(nix::unistd::getppid());
    }
    started.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

/// `connections` connected pairs on 127.0.0.1: the writing ends (with
/// `TCP_NODELAY`) and the reading ends (non-blocking).
fn pairs(connections: usize) -> anyhow::Result<(Vec<TcpStream>, Vec<TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(connections);
    let mut readers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let reader = TcpStream::connect(addr)?;
        let (writer, _) = listener.accept()?;
        writer.set_nodelay(true)?;
        reader.set_nonblocking(true)?;
        writers.push(writer);
        readers.push(reader);
    }
    Ok((writers, readers))
}

/// What the reader did over the run.
struct Reads {
    cpu: Duration,
    reads: u64,
    /// `epoll_wait` calls that returned something.
    wakeups: u64,
}

/// Reads every connection until `expected` bytes have arrived, one read per
/// readiness as the generator's members do (a read that fills less than
/// the buffer has emptied the socket; the edge-triggered set reports it
/// again when more arrives).
fn read_all(mut readers: Vec<TcpStream>, expected: u64, cpu: usize) -> anyhow::Result<Reads> {
    pin(cpu)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, reader) in readers.iter().enumerate() {
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        epoll.add(reader.as_fd(), EpollEvent::new(flags, i as u64))?;
    }
    let mut events = vec![EpollEvent::empty(); readers.len()];
    let mut buf = vec![0u8; 16 * 1024];
    let (mut received, mut reads, mut wakeups) = (0u64, 0u64, 0u64);
    let started = thread_cpu();
    let mut ready: Vec<usize> = Vec::new();
    while received < expected {
        let n = epoll.wait(&mut events, EpollTimeout::from(5_000u16))?;
        anyhow::ensure!(n > 0, "no frame for 5 s ({received} of {expected} bytes)");
        wakeups += 1;
        ready.extend(events[..n].iter().map(|e| e.data() as usize));
        // A socket stays ready until a read leaves it empty.
        while let Some(i) = ready.pop() {
            reads += 1;
            match readers[i].read(&mut buf) {
                Ok(0) => anyhow::bail!("a connection closed ({received} of {expected} bytes)"),
                Ok(got) => {
                    received += got as u64;
                    if got == buf.len() {
                        ready.push(i);
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                Err(err) if err.kind() == ErrorKind::Interrupted => ready.push(i),
                Err(err) => return Err(err.into()),
            }
        }
    }
    Ok(Reads {
        cpu: thread_cpu() - started,
        reads,
        wakeups,
    })
}

/// Writes a frame to each connection in turn, `rate` frames a second for
/// `duration`; returns the writer's CPU time and how long the writes took.
fn write_all(
    writers: &mut [TcpStream],
    args: &LoopbackArgs,
    frame: &[u8],
) -> anyhow::Result<(Duration, Duration)> {
    pin(args.writer_cpu)?;
    let interval = Duration::from_secs_f64(writers.len() as f64 / args.rate);
    let started = Instant::now();
    let cpu_before = thread_cpu();
    for round in 0..args.rounds() {
        let due = started + interval.mul_f64(round as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for writer in writers.iter_mut() {
            writer.write_all(frame)?;
        }
    }
    Ok((thread_cpu() - cpu_before, started.elapsed()))
}

/// Waits for a writer thread and its reader thread, and returns both
/// results or the failure. A side that fails ends the other's connections,
/// so when both failed both are said.
pub fn join_both<W, R>(
    writer: std::thread::JoinHandle<anyhow::Result<W>>,
    reader: std::thread::JoinHandle<anyhow::Result<R>>,
) -> anyhow::Result<(W, R)> {
    let joined = |what| move |_| anyhow::anyhow!("the {what} panicked");
    let written = writer.join().map_err(joined("writer"))?;
    let read = reader.join().map_err(joined("reader"))?;
    match (written, read) {
        (Ok(written), Ok(read)) => Ok((written, read)),
        (Err(writer), Err(reader)) => {
            anyhow::bail!("the writer: {writer:#}; the reader: {reader:#}")
        }
        (Err(err), _) | (_, Err(err)) => Err(err),
    }
}

pub fn run(args: LoopbackArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(args.frame_bytes > 0, "--frame-bytes must be at least 1");
    allowed(args.writer_cpu)?;
    allowed(args.reader_cpu)?;
    let (mut writers, readers) = pairs(args.connections)?;
    let expected = args.frames() * args.frame_bytes as u64;
    let reader_cpu = args.reader_cpu;
    let reader = std::thread::spawn(move || read_all(readers, expected, reader_cpu));
    // Its own thread, so that pinning it leaves the caller's alone.
    let writer = std::thread::spawn(move || {
        let frame = vec![b'x'; args.frame_bytes];
        let written = write_all(&mut writers, &args, &frame)?;
        anyhow::Ok((written, null_syscall_ns(), args))
    });
    let (((writer_cpu, took), syscall_ns, args), read) = join_both(writer, reader)?;
    let frames = args.frames();
    let per_frame_us = |cpu: Duration| cpu.as_secs_f64() * 1e6 / frames.max(1) as f64;
    let seconds = took.as_secs_f64().max(1e-9);
    let share = |cpu: Duration| 100.0 * cpu.as_secs_f64() / seconds;
    let wakeup = crate::wakeup::measure(args.writer_cpu, args.reader_cpu)?;
    Ok(json!({
        "scenario": "loopback",
        "connections": args.connections,
        "frame_bytes": args.frame_bytes,
        "target_rate": args.rate,
        "frames": frames,
        "frames_per_second": frames as f64 / seconds,
        "null_syscall_ns": syscall_ns,
        "wakeup": wakeup,
        "writer": {
            "cpu": args.writer_cpu,
            "cpu_us_per_frame": per_frame_us(writer_cpu),
            "percent_of_one_core": share(writer_cpu),
        },
        "reader": {
            "cpu": args.reader_cpu,
            "cpu_us_per_frame": per_frame_us(read.cpu),
            "percent_of_one_core": share(read.cpu),
            "reads_per_frame": read.reads as f64 / frames.max(1) as f64,
            "frames_per_wakeup": frames as f64 / read.wakeups.max(1) as f64,
        },
    }))
}
