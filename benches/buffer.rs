//! Micro-benchmarks of the spill buffer alone: how fast bytes pass through
//! it in memory mode (the common case) and in spill mode (a slow receiver),
//! with no sockets involved. `cargo bench --bench buffer`.

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use spillway::budget::Budget;
use spillway::spill::{Drain, Fill, SpillBuffer};

const MEMORY: usize = 64 * 1024;

/// An endless sender that hands out up to `chunk` bytes per read.
struct Source {
    chunk: usize,
}
impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk);
        buf[..n].fill(0xA5);
        Ok(n)
    }
}

/// A receiver that takes everything and keeps nothing.
struct Sink;
impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(black_box(buf).len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn fill(buf: &mut SpillBuffer, src: &mut Source, scratch: &mut [u8], bytes: u64) {
    let target = buf.len() + bytes;
    while buf.len() < target {
        match buf.fill_from(src, scratch) {
            Fill::Took(_) => {}
            other => panic!("fill: {other:?}"),
        }
    }
}

fn drain(buf: &mut SpillBuffer) {
    loop {
        match buf.drain_into(&mut Sink) {
            Drain::Gave(_) => {}
            Drain::Empty => return,
            other => panic!("drain: {other:?}"),
        }
    }
}

fn memory_mode(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("buffer/memory");
    group.throughput(Throughput::Bytes(MEMORY as u64));
    let mut buf = SpillBuffer::new(
        MEMORY,
        1 << 30,
        Arc::<Path>::from(dir.path()),
        Arc::new(Budget::new(None)),
    );
    let mut src = Source { chunk: MEMORY };
    let mut scratch = vec![0u8; MEMORY];
    group.bench_function("fill+drain 64KiB", |b| {
        b.iter(|| {
            fill(&mut buf, &mut src, &mut scratch, MEMORY as u64);
            drain(&mut buf);
        })
    });
    group.finish();
}

fn spill_mode(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let backlog: u64 = 16 << 20;
    let mut group = c.benchmark_group("buffer/spill");
    group.throughput(Throughput::Bytes(backlog));
    group.sample_size(20);
    let mut buf = SpillBuffer::new(
        MEMORY,
        1 << 30,
        Arc::<Path>::from(dir.path()),
        Arc::new(Budget::new(None)),
    );
    let mut src = Source { chunk: MEMORY };
    let mut scratch = vec![0u8; MEMORY];
    group.bench_function("fill 16MiB to disk, drain", |b| {
        b.iter(|| {
            fill(&mut buf, &mut src, &mut scratch, backlog);
            drain(&mut buf);
        })
    });
    group.finish();
}

criterion_group!(benches, memory_mode, spill_mode);
criterion_main!(benches);
