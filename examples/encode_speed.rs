//! Single-thread speed of the entropy encoder on one LLaMA-7B MLP-shaped tensor: 4096 x 11008
//! = 45 M elements, 5 % kept at uniform random positions, levels from a 16-level bell-shaped
//! histogram (binomial(15, 1/2)). Prints ns per kept entry for the position streams (Golomb),
//! the level streams (rANS), whole blocks (`BlockCodec::encode_block`), the level histogram
//! and the whole tensor (`encode_tensor`, which includes the histogram check, in a one-thread
//! pool), the fastest of `UD_REPEAT` runs (default 7), and a
//! hash of the encoded bytes (equal hashes: equal bytes, e.g. before and after a change).
//!
//! `cargo run --release --example encode_speed`

use std::hint::black_box;
use std::time::Instant;
use udelta_gpu::codec::{self, golomb, rans, BlockCodec, BLOCK_ELEMENTS};
use udelta_gpu::splitmix::mix64;

const ROWS: u64 = 4096;
const COLS: u64 = 11008;
/// One element in `KEEP_ONE_IN` is kept.
const KEEP_ONE_IN: u64 = 20;
const LEVELS: usize = 16;

/// The kept positions and their levels.
fn kept_entries(numel: u64) -> (Vec<u32>, Vec<u8>) {
    let positions: Vec<u32> = (0..numel)
        .filter(|&i| mix64(i) % KEEP_ONE_IN == 0)
        .map(|i| i as u32)
        .collect();
    // binomial(15, 1/2): the number of set bits among 15 random ones.
    let levels = positions
        .iter()
        .map(|&p| (mix64(u64::from(p) ^ 0x5EED) & 0x7FFF).count_ones() as u8)
        .collect();
    (positions, levels)
}

/// The fastest of `repeat` runs of `f`, in seconds.
fn fastest(repeat: usize, mut f: impl FnMut()) -> f64 {
    (0..repeat)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Folds bytes into a running hash.
fn hash_into(h: &mut u64, bytes: &[u8]) {
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        *h = mix64(*h ^ u64::from_le_bytes(w));
    }
    *h = mix64(*h ^ bytes.len() as u64);
}

fn main() {
    let repeat: usize = std::env::var("UD_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let numel = ROWS * COLS;
    let (positions, levels) = kept_entries(numel);
    let mut counts = vec![0u64; LEVELS];
    levels.iter().for_each(|&l| counts[usize::from(l)] += 1);
    let codec = BlockCodec::new(numel, &counts).expect("codec");
    let table = codec.table();
    // Per block: its range of kept entries and their offsets from the block start.
    let blocks: Vec<(usize, usize, u32, Vec<u32>)> = (0..codec.block_count())
        .map(|b| {
            let (start, len) = codec.block_range(b);
            let lo = positions.partition_point(|&p| u64::from(p) < start);
            let hi = positions.partition_point(|&p| u64::from(p) < start + BLOCK_ELEMENTS);
            let offsets = positions[lo..hi]
                .iter()
                .map(|&p| p - start as u32)
                .collect();
            (lo, hi, len, offsets)
        })
        .collect();
    let kept = positions.len() as f64;
    println!(
        "{} elements, {} kept ({:.2} %), {} blocks, {LEVELS} levels; fastest of {repeat} runs, one thread",
        numel,
        positions.len(),
        100.0 * kept / numel as f64,
        blocks.len()
    );

    let t_pos = fastest(repeat, || {
        for (_, _, len, offsets) in &blocks {
            black_box(golomb::encode_block_positions(*len, black_box(offsets)));
        }
    });
    let t_lev = fastest(repeat, || {
        for (lo, hi, _, _) in &blocks {
            black_box(rans::encode(table, black_box(&levels[*lo..*hi])).expect("levels"));
        }
    });
    let t_block = fastest(repeat, || {
        for (b, (lo, hi, _, _)) in blocks.iter().enumerate() {
            black_box(
                codec
                    .encode_block(b, &positions[*lo..*hi], &levels[*lo..*hi])
                    .expect("block"),
            );
        }
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let mut encoded = None;
    let t_tensor = pool.install(|| {
        fastest(repeat, || {
            encoded =
                Some(codec::encode_tensor(numel, &positions, &levels, &counts).expect("tensor"));
        })
    });
    let t_hist = pool.install(|| {
        fastest(repeat, || {
            black_box(codec::level_histogram(black_box(&levels)));
        })
    });
    let encoded = encoded.expect("encoded");
    let mut h = 0u64;
    hash_into(&mut h, &encoded.positions);
    hash_into(&mut h, &encoded.levels);
    for info in &encoded.blocks {
        h = mix64(h ^ u64::from(info.kept) ^ u64::from(info.position_bytes) << 21);
        h = mix64(h ^ u64::from(info.level_bytes));
    }
    let ns = |t: f64| t * 1e9 / kept;
    println!("positions (Golomb)  {:6.2} ns/entry", ns(t_pos));
    println!("levels (rANS)       {:6.2} ns/entry", ns(t_lev));
    println!("encode_block        {:6.2} ns/entry", ns(t_block));
    println!("  level_histogram   {:6.2} ns/entry", ns(t_hist));
    println!("encode_tensor       {:6.2} ns/entry", ns(t_tensor));
    println!(
        "bytes: positions {}, levels {}, hash {h:016x}",
        encoded.positions.len(),
        encoded.levels.len()
    );
}
