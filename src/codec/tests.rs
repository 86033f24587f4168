//! Tensor-level tests: round trips, efficiency bounds, corruption, thread independence.

use super::*;

/// The crate's SplitMix64 stream, for test data.
struct Rng(crate::splitmix::SplitMix64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(crate::splitmix::SplitMix64(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0.unit()
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// A test tensor: Bernoulli(p) positions, levels from a discretized normal around the middle
/// level (the shape UltraDelta's kept levels have), and their histogram.
struct Case {
    numel: u64,
    positions: Vec<u32>,
    levels: Vec<u8>,
    counts: Vec<u64>,
}

fn gen(seed: u64, numel: u64, p: f64, bits: u32) -> Case {
    let mut rng = Rng::new(seed);
    let nlevels = 1usize << bits;
    let threshold = (p * 2f64.powi(64)).min(u64::MAX as f64) as u64;
    let mut positions = Vec::new();
    for i in 0..numel {
        if p >= 1.0 || rng.next() < threshold {
            positions.push(i as u32);
        }
    }
    let mid = (nlevels - 1) as f64 / 2.0;
    let sd = (nlevels as f64 / 6.0).max(0.5);
    let levels: Vec<u8> = positions
        .iter()
        .map(|_| {
            // Box-Muller.
            let (u1, u2) = (rng.unit().max(1e-300), rng.unit());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (mid + sd * z).round().clamp(0.0, (nlevels - 1) as f64) as u8
        })
        .collect();
    let mut counts = vec![0u64; nlevels];
    for &l in &levels {
        counts[usize::from(l)] += 1;
    }
    Case {
        numel,
        positions,
        levels,
        counts,
    }
}

fn round_trip_case(c: &Case) -> EncodedTensor {
    let enc = encode_tensor(c.numel, &c.positions, &c.levels, &c.counts).unwrap();
    assert_eq!(enc.blocks.len(), block_count(c.numel));
    assert_eq!(
        enc.blocks.iter().map(|b| b.kept as usize).sum::<usize>(),
        c.positions.len()
    );
    for b in &enc.blocks {
        if b.kept == 0 {
            assert_eq!((b.position_bytes, b.level_bytes), (0, 0));
        }
    }
    let (pos, lev) =
        decode_tensor(c.numel, &c.counts, &enc.blocks, &enc.positions, &enc.levels).unwrap();
    assert_eq!(pos, c.positions);
    assert_eq!(lev, c.levels);
    enc
}

fn h2(p: f64) -> f64 {
    if p <= 0.0 || p >= 1.0 {
        0.0
    } else {
        -p * p.log2() - (1.0 - p) * (1.0 - p).log2()
    }
}

/// Empirical entropy in bits of the levels: sum over kept entries of -log2(count / kept).
fn level_entropy_bits(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| c as f64 * -(c as f64 / total as f64).log2())
        .sum()
}

#[test]
fn codec_block_count() {
    assert_eq!(block_count(0), 0);
    assert_eq!(block_count(1), 1);
    assert_eq!(block_count(BLOCK_ELEMENTS), 1);
    assert_eq!(block_count(BLOCK_ELEMENTS + 1), 2);
    assert_eq!(block_count(MAX_NUMEL), 4096);
}

#[test]
fn codec_round_trip_edge_cases() {
    // Empty tensor.
    let enc = encode_tensor(0, &[], &[], &[0; 16]).unwrap();
    assert_eq!(enc.blocks, vec![]);
    assert!(enc.positions.is_empty() && enc.levels.is_empty());
    assert_eq!(
        decode_tensor(0, &[0; 16], &[], &[], &[]).unwrap(),
        (vec![], vec![])
    );
    // numel 1, kept 0 and kept 1.
    round_trip_case(&Case {
        numel: 1,
        positions: vec![],
        levels: vec![],
        counts: vec![0; 16],
    });
    let enc = round_trip_case(&Case {
        numel: 1,
        positions: vec![0],
        levels: vec![5],
        counts: (0..16).map(|l| u64::from(l == 5)).collect(),
    });
    assert_eq!(enc.positions.len() + enc.levels.len(), 0);
    // kept = 0 in a multi-block tensor: no bytes at all.
    let enc = round_trip_case(&gen(1, 3 * BLOCK_ELEMENTS + 5, 0.0, 4));
    assert!(enc.positions.is_empty() && enc.levels.is_empty());
    // kept = numel: complement coding makes the position streams empty.
    let c = gen(2, BLOCK_ELEMENTS + 777, 1.0, 4);
    let enc = round_trip_case(&c);
    assert!(enc.positions.is_empty());
    assert_eq!(enc.blocks[1].kept, 777);
    // Block boundary: numel = BLOCK_ELEMENTS + 1, kept at BLOCK_ELEMENTS - 1 and BLOCK_ELEMENTS.
    let enc = round_trip_case(&Case {
        numel: BLOCK_ELEMENTS + 1,
        positions: vec![(BLOCK_ELEMENTS - 1) as u32, BLOCK_ELEMENTS as u32],
        levels: vec![0, 1],
        counts: vec![1, 1],
    });
    assert_eq!(enc.blocks.len(), 2);
    assert_eq!((enc.blocks[0].kept, enc.blocks[1].kept), (1, 1));
    // The second block has one element, all kept: no position bytes.
    assert_eq!(enc.blocks[1].position_bytes, 0);
    // Single-symbol levels: no level bytes anywhere.
    let mut c = gen(3, 2 * BLOCK_ELEMENTS + 3, 0.05, 4);
    c.levels.iter_mut().for_each(|l| *l = 9);
    c.counts = (0..16)
        .map(|l| if l == 9 { c.levels.len() as u64 } else { 0 })
        .collect();
    let enc = round_trip_case(&c);
    assert!(enc.levels.is_empty());
    // bits = 1 and bits = 8, several densities including > 1/2 (complement mode).
    for (seed, bits, p) in [
        (4, 1, 0.05),
        (5, 1, 0.5),
        (6, 8, 0.01),
        (7, 8, 0.3),
        (8, 4, 0.7),
        (9, 2, 0.999),
        (10, 4, 0.0001),
        (11, 3, 0.51),
    ] {
        round_trip_case(&gen(seed, BLOCK_ELEMENTS + 12_345, p, bits));
    }
    // Small tensors at every density step.
    for numel in [2u64, 3, 7, 64, 1000] {
        for p in [0.1, 0.4, 0.5, 0.6, 0.9] {
            round_trip_case(&gen(numel * 31 + (p * 10.0) as u64, numel, p, 4));
        }
    }
}

#[test]
fn codec_round_trip_clustered() {
    // Kept entries bunched at the ends of blocks: long gaps, long complement runs.
    let numel = 2 * BLOCK_ELEMENTS + 100;
    let mut positions: Vec<u32> = (0..50).collect();
    positions.extend((BLOCK_ELEMENTS - 50..BLOCK_ELEMENTS + 600_000).map(|p| p as u32));
    positions.extend((numel - 10..numel).map(|p| p as u32));
    let levels: Vec<u8> = (0..positions.len()).map(|i| (i % 3) as u8).collect();
    let mut counts = vec![0u64; 4];
    levels.iter().for_each(|&l| counts[usize::from(l)] += 1);
    round_trip_case(&Case {
        numel,
        positions,
        levels,
        counts,
    });
}

/// Encodes a 4M-element tensor at density `p` and returns (position bits, numel * H2(p),
/// level bits, level entropy bits, blocks with a level stream).
fn efficiency(p: f64, bits: u32) -> (f64, f64, f64, f64, usize) {
    let c = gen((p * 1e6) as u64, 4 * BLOCK_ELEMENTS, p, bits);
    let enc = round_trip_case(&c);
    let actual_p = c.positions.len() as f64 / c.numel as f64;
    let level_blocks = enc.blocks.iter().filter(|b| b.level_bytes > 0).count();
    (
        enc.positions.len() as f64 * 8.0,
        c.numel as f64 * h2(actual_p),
        enc.levels.len() as f64 * 8.0,
        level_entropy_bits(&c.counts),
        level_blocks,
    )
}

#[test]
fn codec_efficiency_within_three_percent() {
    for p in [0.005, 0.01, 0.03, 0.05, 0.1] {
        let (pb, pe, lb, le, nb) = efficiency(p, 4);
        assert!(
            pb <= 1.03 * pe,
            "p = {p}: position bits {pb} vs entropy {pe}"
        );
        // Per-block rANS flush: 4 bytes per block.
        let lb_net = lb - 32.0 * nb as f64;
        assert!(
            lb_net <= 1.03 * le,
            "p = {p}: level bits {lb} vs entropy {le}"
        );
        // Lower bounds guard against a broken measurement.
        assert!(pb >= 0.95 * pe && lb >= 0.99 * le);
    }
}

#[test]
fn codec_thread_count_independence() {
    let c = gen(42, 5 * BLOCK_ELEMENTS + 999, 0.04, 4);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| encode_tensor(c.numel, &c.positions, &c.levels, &c.counts).unwrap())
    };
    let one = run(1);
    let two = run(2);
    let four = run(4);
    assert_eq!(one, two);
    assert_eq!(one, four);
    assert_eq!(one.blocks.len(), 6);
}

#[test]
fn codec_encoder_rejects_bad_input() {
    let counts = vec![1u64, 1];
    // Not strictly increasing (equal, then decreasing, across blocks).
    assert!(matches!(
        encode_tensor(10, &[3, 3], &[0, 1], &counts),
        Err(CodecError::Input(_))
    ));
    assert!(encode_tensor(10, &[4, 3], &[0, 1], &counts).is_err());
    let big = BLOCK_ELEMENTS as u32;
    assert!(encode_tensor(2 * BLOCK_ELEMENTS, &[big + 1, 5], &[0, 1], &counts).is_err());
    // Out of range.
    assert!(encode_tensor(10, &[3, 10], &[0, 1], &counts).is_err());
    assert!(encode_tensor(0, &[0], &[0], &[1, 0]).is_err());
    // Level out of range, histogram mismatch, length mismatch.
    assert!(encode_tensor(10, &[3, 4], &[0, 2], &counts).is_err());
    assert!(encode_tensor(10, &[3, 4], &[0, 0], &counts).is_err());
    assert!(encode_tensor(10, &[3, 4], &[0], &counts).is_err());
    // Bad histogram length, numel too large.
    assert!(matches!(
        encode_tensor(10, &[3], &[0], &[1, 0, 0]),
        Err(CodecError::Histogram(_))
    ));
    assert!(encode_tensor(10, &[3], &[0], &[1]).is_err());
    assert!(encode_tensor(MAX_NUMEL + 1, &[3], &[0], &[1, 0]).is_err());
    // The good version of the same input works.
    assert!(encode_tensor(10, &[3, 4], &[0, 1], &counts).is_ok());
}

/// Decodes with `std::panic::catch_unwind` so a panic fails the test with the case named.
fn decode_no_panic(
    what: &str,
    numel: u64,
    counts: &[u64],
    blocks: &[BlockInfo],
    pos: &[u8],
    lev: &[u8],
) -> Result<(Vec<u32>, Vec<u8>), CodecError> {
    std::panic::catch_unwind(|| decode_tensor(numel, counts, blocks, pos, lev))
        .unwrap_or_else(|_| panic!("decoder panicked on {what}"))
}

#[test]
fn codec_corruption_block_table() {
    let c = gen(7, 3 * BLOCK_ELEMENTS + 1234, 0.03, 4);
    let enc = encode_tensor(c.numel, &c.positions, &c.levels, &c.counts).unwrap();
    let dec = |blocks: &[BlockInfo], pos: &[u8], lev: &[u8], counts: &[u64], numel: u64| {
        decode_no_panic("block table", numel, counts, blocks, pos, lev)
    };
    let (p, l) = (&enc.positions[..], &enc.levels[..]);
    assert!(dec(&enc.blocks, p, l, &c.counts, c.numel).is_ok());
    // Wrong block count.
    assert!(dec(&enc.blocks[..3], p, l, &c.counts, c.numel).is_err());
    // Wrong numel (changes the block count or the last block's length).
    assert!(dec(&enc.blocks, p, l, &c.counts, c.numel + BLOCK_ELEMENTS).is_err());
    // (numel - 1 would be a valid reading unless the last element is kept: the last block's
    // 1234 elements hold about 37 kept entries, so cutting 1000 elements puts some outside.)
    assert!(dec(&enc.blocks, p, l, &c.counts, c.numel - 1000).is_err());
    assert!(dec(&enc.blocks, p, l, &c.counts, MAX_NUMEL + 1).is_err());
    // Wrong histogram.
    let mut counts = c.counts.clone();
    counts[3] += 1;
    assert!(dec(&enc.blocks, p, l, &counts, c.numel).is_err());
    counts[3] -= 1;
    counts[4] += 1;
    counts[8] -= 1;
    assert!(dec(&enc.blocks, p, l, &counts, c.numel).is_err());
    assert!(dec(&enc.blocks, p, l, &c.counts[..8], c.numel).is_err());
    assert!(dec(&enc.blocks, p, l, &[u64::MAX, 2], c.numel).is_err());
    // Every field of every block, nudged up and down.
    let mut rng = Rng::new(5);
    for b in 0..enc.blocks.len() {
        for field in 0..3 {
            for delta in [1i64, -1, 1000, -(rng.below(50) as i64) - 2] {
                let mut blocks = enc.blocks.clone();
                let f = match field {
                    0 => &mut blocks[b].kept,
                    1 => &mut blocks[b].position_bytes,
                    _ => &mut blocks[b].level_bytes,
                };
                *f = (i64::from(*f) + delta).clamp(0, u32::MAX as i64) as u32;
                if blocks == enc.blocks {
                    continue;
                }
                assert!(
                    dec(&blocks, p, l, &c.counts, c.numel).is_err(),
                    "block {b} field {field} delta {delta}"
                );
            }
        }
    }
    // Moving bytes between adjacent blocks keeps the totals but breaks both blocks.
    for b in 0..enc.blocks.len() - 1 {
        for field in 0..3 {
            let mut blocks = enc.blocks.clone();
            let (x, y) = blocks.split_at_mut(b + 1);
            let (f, g) = match field {
                0 => (&mut x[b].kept, &mut y[0].kept),
                1 => (&mut x[b].position_bytes, &mut y[0].position_bytes),
                _ => (&mut x[b].level_bytes, &mut y[0].level_bytes),
            };
            *f += 1;
            *g -= 1;
            assert!(
                dec(&blocks, p, l, &c.counts, c.numel).is_err(),
                "shift at block {b} field {field}"
            );
        }
    }
}

#[test]
fn codec_corruption_truncation() {
    let c = gen(8, 2 * BLOCK_ELEMENTS + 99, 0.02, 4);
    let enc = encode_tensor(c.numel, &c.positions, &c.levels, &c.counts).unwrap();
    // Truncate one block's stream by 1..=3 bytes and fix the block table so the lengths agree:
    // the block itself must fail to decode.
    for b in 0..enc.blocks.len() {
        for stream in [Stream::Positions, Stream::Levels] {
            for cut in 1..=3u32 {
                let mut blocks = enc.blocks.clone();
                let start: u64 = enc.blocks[..b]
                    .iter()
                    .map(|i| {
                        u64::from(match stream {
                            Stream::Positions => i.position_bytes,
                            Stream::Levels => i.level_bytes,
                        })
                    })
                    .sum();
                let (field, bytes) = match stream {
                    Stream::Positions => (&mut blocks[b].position_bytes, &enc.positions),
                    Stream::Levels => (&mut blocks[b].level_bytes, &enc.levels),
                };
                if *field < cut {
                    continue;
                }
                *field -= cut;
                let end = start as usize + *field as usize;
                let mut cut_bytes = bytes[..end].to_vec();
                cut_bytes.extend_from_slice(&bytes[end + cut as usize..]);
                let (pos, lev) = match stream {
                    Stream::Positions => (&cut_bytes[..], &enc.levels[..]),
                    Stream::Levels => (&enc.positions[..], &cut_bytes[..]),
                };
                let r = decode_no_panic("truncation", c.numel, &c.counts, &blocks, pos, lev);
                assert!(
                    matches!(&r, Err(CodecError::Corrupt { block, stream: s, .. }) if *block == b && *s == stream),
                    "block {b} {stream} cut {cut}: {r:?}"
                );
            }
        }
    }
    // Truncated payload without fixing the table.
    let r = decode_no_panic(
        "truncated payload",
        c.numel,
        &c.counts,
        &enc.blocks,
        &enc.positions[..enc.positions.len() - 1],
        &enc.levels,
    );
    assert!(matches!(r, Err(CodecError::BlockTable(_))));
}

#[test]
fn codec_corruption_random_bytes() {
    let c = gen(9, BLOCK_ELEMENTS + 4321, 0.05, 4);
    let enc = encode_tensor(c.numel, &c.positions, &c.levels, &c.counts).unwrap();
    let mut rng = Rng::new(77);
    let mut undetected_position_flips = 0;
    let trials = 300;
    for t in 0..trials {
        // Flip 1..=4 random bits of the level stream: always detected (final rANS state, exact
        // consumption, histogram).
        let mut lev = enc.levels.clone();
        for _ in 0..=rng.below(4) {
            let i = rng.below(lev.len() as u64) as usize;
            lev[i] ^= 1 << rng.below(8);
        }
        let r = decode_no_panic(
            "level flips",
            c.numel,
            &c.counts,
            &enc.blocks,
            &enc.positions,
            &lev,
        );
        assert!(r.is_err(), "level flip trial {t} undetected");
        // Flip bits of the position stream: a flip inside a truncated-binary remainder turns one
        // valid codeword into another, so some flips can decode to different valid positions
        // (the container's record checksum catches those). Never a panic, and almost always Err.
        let mut pos = enc.positions.clone();
        let i = rng.below(pos.len() as u64) as usize;
        pos[i] ^= 1 << rng.below(8);
        match decode_no_panic(
            "position flip",
            c.numel,
            &c.counts,
            &enc.blocks,
            &pos,
            &enc.levels,
        ) {
            Err(_) => {}
            Ok((p, l)) => {
                assert_ne!(p, c.positions);
                assert!(p.windows(2).all(|w| w[0] < w[1]));
                assert!(p.iter().all(|&x| u64::from(x) < c.numel));
                assert_eq!(l, c.levels);
                undetected_position_flips += 1;
            }
        }
    }
    // Measured: about half of single position-bit flips are caught here (those in unary
    // quotients desynchronize the parse); the rest are the checksum's job.
    assert!(
        undetected_position_flips * 4 < trials * 3,
        "{undetected_position_flips} of {trials} position flips decoded"
    );
    // Complete garbage in both streams, with a plausible block table.
    for t in 0..200 {
        let nb = enc.blocks.len();
        let blocks: Vec<BlockInfo> = (0..nb)
            .map(|b| BlockInfo {
                kept: enc.blocks[b].kept,
                position_bytes: rng.below(3000) as u32,
                level_bytes: rng.below(3000) as u32,
            })
            .collect();
        let plen: u64 = blocks.iter().map(|b| u64::from(b.position_bytes)).sum();
        let llen: u64 = blocks.iter().map(|b| u64::from(b.level_bytes)).sum();
        let pos: Vec<u8> = (0..plen).map(|_| rng.next() as u8).collect();
        let lev: Vec<u8> = (0..llen).map(|_| rng.next() as u8).collect();
        let r = decode_no_panic("garbage", c.numel, &c.counts, &blocks, &pos, &lev);
        assert!(r.is_err(), "garbage trial {t} decoded");
    }
    // Garbage streams against small tensors and random tables (every kept count).
    for t in 0..2000 {
        let numel = 1 + rng.below(300);
        let kept = rng.below(numel + 1);
        let mut counts = vec![0u64; 4];
        let mut left = kept;
        for c in counts.iter_mut().take(3) {
            *c = rng.below(left + 1);
            left -= *c;
        }
        counts[3] = left;
        let blocks = [BlockInfo {
            kept: kept as u32,
            position_bytes: rng.below(40) as u32,
            level_bytes: rng.below(40) as u32,
        }];
        let pos: Vec<u8> = (0..blocks[0].position_bytes)
            .map(|_| rng.next() as u8)
            .collect();
        let lev: Vec<u8> = (0..blocks[0].level_bytes)
            .map(|_| rng.next() as u8)
            .collect();
        // Only "no panic" can be asserted for tiny streams: e.g. an all-kept block with empty
        // streams is valid. Decoded output, if any, must still be well-formed.
        if let Ok((p, l)) = decode_no_panic("small garbage", numel, &counts, &blocks, &pos, &lev) {
            assert_eq!(p.len() as u64, kept, "trial {t}");
            assert!(p.windows(2).all(|w| w[0] < w[1]) && p.iter().all(|&x| u64::from(x) < numel));
            assert_eq!(l.len() as u64, kept);
        }
    }
}

/// A case encoded, with its codec and checked block layout.
fn encoded_layout(c: &Case) -> (EncodedTensor, BlockCodec, Vec<BlockSpan>) {
    let enc = encode_tensor(c.numel, &c.positions, &c.levels, &c.counts).unwrap();
    let codec = BlockCodec::new(c.numel, &c.counts).unwrap();
    let (p, l) = (enc.positions.len() as u64, enc.levels.len() as u64);
    let spans = codec.layout(&enc.blocks, p, l).unwrap();
    (enc, codec, spans)
}

#[test]
fn codec_streaming_block_api() {
    // Decoding block by block with BlockCodec gives the same as decode_tensor.
    let c = gen(12, 3 * BLOCK_ELEMENTS + 17, 0.02, 4);
    let (enc, codec, spans) = encoded_layout(&c);
    let mut hist = vec![0u64; 256];
    let mut all_pos = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        assert_eq!(s.element_start, i as u64 * BLOCK_ELEMENTS);
        let k = s.info.kept as usize;
        let (mut p, mut l) = (vec![0u32; k], vec![0u8; k]);
        let ps = s.position_start as usize;
        let ls = s.level_start as usize;
        codec
            .decode_block(
                i,
                &s.info,
                &enc.positions[ps..ps + s.info.position_bytes as usize],
                &enc.levels[ls..ls + s.info.level_bytes as usize],
                &mut p,
                &mut l,
            )
            .unwrap();
        level_histogram(&l)
            .iter()
            .enumerate()
            .for_each(|(v, n)| hist[v] += n);
        all_pos.extend(p);
    }
    assert_eq!(all_pos, c.positions);
    codec.check_histogram(&hist).unwrap();
    hist[0] += 1;
    assert!(codec.check_histogram(&hist).is_err());
    assert_eq!(spans.last().unwrap().element_len, 17);
}

/// One block decoded the way `decode_block` did before it interleaved the streams: all
/// positions, then all levels, the position error first.
fn decode_block_one_stream_after_the_other(
    codec: &BlockCodec,
    block: usize,
    info: &BlockInfo,
    positions: &[u8],
    levels: &[u8],
) -> Result<(Vec<u32>, Vec<u8>), String> {
    let (start, len) = codec.block_range(block);
    let kept = info.kept as usize;
    let (mut p, mut l) = (vec![0u32; kept], vec![0u8; kept]);
    golomb::decode_block_positions(len, start as u32, positions, &mut p)
        .map_err(|m| format!("block {block}: position stream: {m}"))?;
    rans::decode(codec.table(), levels, &mut l)
        .map_err(|m| format!("block {block}: level stream: {m}"))?;
    Ok((p, l))
}

#[test]
fn codec_interleaved_block_decode_equals_one_stream_after_the_other() {
    let c = gen(21, 3 * BLOCK_ELEMENTS / 2, 0.055, 4);
    let (enc, codec, spans) = encoded_layout(&c);
    let span = spans[0];
    let block_bytes =
        |all: &[u8], start: u64, len: u32| all[start as usize..][..len as usize].to_vec();
    let pos = block_bytes(
        &enc.positions,
        span.position_start,
        span.info.position_bytes,
    );
    let lev = block_bytes(&enc.levels, span.level_start, span.info.level_bytes);
    let mut rng = Rng::new(5);
    let (mut accepted, mut level_errors, mut position_errors) = (0, 0, 0);
    for trial in 0..300 {
        // Corrupt one stream, the other, or both (bit flips; same lengths, so the block table
        // still fits), and compare the outcomes, errors included.
        let (mut p, mut l) = (pos.clone(), lev.clone());
        if trial % 3 != 1 {
            let i = rng.below(p.len() as u64) as usize;
            p[i] ^= 1 << rng.below(8);
        }
        if trial % 3 != 0 {
            let i = rng.below(l.len() as u64) as usize;
            l[i] ^= 1 << rng.below(8);
        }
        let kept = span.info.kept as usize;
        let (mut out_p, mut out_l) = (vec![0u32; kept], vec![0u8; kept]);
        let interleaved = codec
            .decode_block(0, &span.info, &p, &l, &mut out_p, &mut out_l)
            .map(|()| (out_p, out_l))
            .map_err(|e| e.to_string());
        let reference = decode_block_one_stream_after_the_other(&codec, 0, &span.info, &p, &l);
        assert_eq!(interleaved, reference, "trial {trial}");
        match &reference {
            Ok(_) => accepted += 1,
            Err(e) if e.contains("level") => level_errors += 1,
            Err(_) => position_errors += 1,
        }
    }
    assert!(
        accepted > 0 && level_errors > 50 && position_errors > 50,
        "{accepted} accepted, {level_errors} level and {position_errors} position errors"
    );
}

#[test]
fn codec_block_beside_another_decodes_as_each_alone() {
    // Two tensors of one element count (two fine-tunes), densities 5.5 % and 3 %.
    let (a, b) = (
        gen(31, BLOCK_ELEMENTS, 0.055, 4),
        gen(32, BLOCK_ELEMENTS, 0.03, 4),
    );
    let (ea, eb) = (
        encode_tensor(a.numel, &a.positions, &a.levels, &a.counts).unwrap(),
        encode_tensor(b.numel, &b.positions, &b.levels, &b.counts).unwrap(),
    );
    let (ca, cb) = (
        BlockCodec::new(a.numel, &a.counts).unwrap(),
        BlockCodec::new(b.numel, &b.counts).unwrap(),
    );
    let (ka, kb) = (ea.blocks[0].kept as usize, eb.blocks[0].kept as usize);
    let mut rng = Rng::new(8);
    let (mut accepted, mut refused) = (0, 0);
    for trial in 0..200 {
        // Flip a bit in a's positions, b's positions, b's levels, or none.
        let (mut ap, mut bp, mut bl) = (
            ea.positions.clone(),
            eb.positions.clone(),
            eb.levels.clone(),
        );
        let stream = match trial % 4 {
            0 => Some(&mut ap),
            1 => Some(&mut bp),
            2 => Some(&mut bl),
            _ => None,
        };
        if let Some(s) = stream {
            let i = rng.below(s.len() as u64) as usize;
            s[i] ^= 1 << rng.below(8);
        }
        let (mut out_a, mut out_p, mut out_l) = (vec![0u32; ka], vec![0u32; kb], vec![0u8; kb]);
        let this = BlockIn {
            info: &eb.blocks[0],
            positions: &bp,
            levels: &bl,
        };
        let other = OtherPositions {
            codec: &ca,
            info: &ea.blocks[0],
            positions: &ap,
            out: &mut out_a,
        };
        let (ra, rb) = cb.decode_block_beside(0, this, &mut out_p, &mut out_l, other);
        let (mut want_a, mut want_p, mut want_l) = (vec![0u32; ka], vec![0u32; kb], vec![0u8; kb]);
        let wa = ca.decode_block_positions(0, &ea.blocks[0], &ap, &mut want_a);
        let wb = cb.decode_block(0, &eb.blocks[0], &bp, &bl, &mut want_p, &mut want_l);
        assert_eq!((&ra, &rb), (&wa, &wb), "trial {trial}");
        if wa.is_ok() {
            assert_eq!(out_a, want_a, "trial {trial}");
        }
        if wb.is_ok() {
            assert_eq!((&out_p, &out_l), (&want_p, &want_l), "trial {trial}");
        }
        if wa.is_ok() && wb.is_ok() {
            accepted += 1
        } else {
            refused += 1
        }
    }
    assert!(
        accepted >= 50 && refused >= 50,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn codec_fused_block_encoder_equals_one_stream_after_the_other() {
    // Blocks in every mode (direct, complement, empty, full), with multi- and single-symbol
    // tables: encode_block (one loop where it applies) against the two streams coded apart
    // from the offsets (each checked against its bit-level reference in golomb and rans).
    let mut fused = 0;
    for (seed, p, bits) in [
        (1u64, 0.05, 4),
        (2, 0.3, 2),
        (3, 0.5, 1),
        (4, 0.7, 3),
        (5, 1.0, 2),
        (6, 0.001, 8),
        (7, 0.0, 1),
    ] {
        let c = gen(seed, 3 * BLOCK_ELEMENTS + 4321, p, bits);
        let mut cases = vec![(c.counts.clone(), c.levels.clone())];
        // The same entries under a single-symbol table (all levels 0).
        let mut single = vec![0u64; c.counts.len()];
        single[0] = c.positions.len() as u64;
        cases.push((single, vec![0; c.levels.len()]));
        for (counts, levels) in &cases {
            let codec = BlockCodec::new(c.numel, counts).unwrap();
            for b in 0..codec.block_count() {
                let (start, len) = codec.block_range(b);
                let lo = c.positions.partition_point(|&x| u64::from(x) < start);
                let hi = c
                    .positions
                    .partition_point(|&x| u64::from(x) < start + u64::from(len));
                let (ps, ls) = (&c.positions[lo..hi], &levels[lo..hi]);
                let got = codec.encode_block(b, ps, ls).unwrap();
                let (pw, lw) = codec.encode_streams_apart(b, ps, ls).unwrap();
                assert_eq!(
                    (&got.positions, &got.levels),
                    (&pw, &lw),
                    "seed {seed}, block {b}"
                );
                let k = ps.len() as u32;
                fused +=
                    usize::from(k > 0 && 2 * k <= len && codec.table().single_symbol().is_none());
            }
        }
    }
    assert!(fused >= 10, "{fused} blocks took the fused path");
}

#[test]
fn codec_fused_block_encoder_reports_bad_entries_as_before() {
    // Block 1 of a 3-block tensor, direct mode: every problem the fused loop meets is named
    // by the one-stream-after-the-other path.
    let codec = BlockCodec::new(3 * BLOCK_ELEMENTS, &[5, 5, 0, 1]).unwrap();
    let s = BLOCK_ELEMENTS as u32;
    let message = |positions: &[u32], levels: &[u8]| match codec.encode_block(1, positions, levels)
    {
        Err(CodecError::Input(m)) => m,
        other => panic!("{positions:?} {levels:?}: {other:?}"),
    };
    assert_eq!(
        message(&[s + 5, s + 5], &[0, 1]),
        format!(
            "block 1: position {} (entry 1 of the block) is not strictly increasing",
            s + 5
        )
    );
    assert_eq!(
        message(&[s + 5, s - 1], &[0, 1]),
        format!(
            "block 1: position {} (entry 1 of the block) is not strictly increasing",
            s - 1
        )
    );
    assert_eq!(
        message(&[s - 1, s + 5], &[0, 1]),
        format!(
            "block 1: position {} (entry 0 of the block) is not strictly increasing",
            s - 1
        )
    );
    assert_eq!(
        message(&[s + 5, 2 * s], &[0, 1]),
        format!(
            "block 1: position {} (entry 1 of the block) is beyond the block (or the tensor)",
            2 * s
        )
    );
    // A zero-frequency level (2), and one beyond the table (9), with valid positions.
    for bad in [2u8, 9] {
        assert_eq!(
            message(&[s + 5, s + 9, s + 20], &[0, bad, 1]),
            "block 1: level has zero frequency in the histogram"
        );
    }
    // Both wrong: the position problem is reported (positions are checked first).
    assert!(message(&[s + 9, s + 5], &[2, 0]).contains("not strictly increasing"));
    // A valid block round-trips.
    let enc = codec
        .encode_block(1, &[s + 5, s + 9, s + 20], &[0, 3, 1])
        .unwrap();
    let (mut p, mut l) = ([0u32; 3], [0u8; 3]);
    codec
        .decode_block(1, &enc.info, &enc.positions, &enc.levels, &mut p, &mut l)
        .unwrap();
    assert_eq!((p, l), ([s + 5, s + 9, s + 20], [0, 3, 1]));
}

#[test]
fn codec_level_histogram_counts_every_level() {
    // Against a plain count: several 2^16-entry chunks plus a tail that is not a multiple of
    // four, long runs of one level (every sub-histogram takes a share) and all 256 levels.
    let mut rng = Rng::new(11);
    let mut levels: Vec<u8> = (0..3 * (1 << 16) + 7).map(|_| rng.next() as u8).collect();
    levels[1000..90_000].fill(200);
    let mut want = vec![0u64; 256];
    for &l in &levels {
        want[usize::from(l)] += 1;
    }
    assert_eq!(level_histogram(&levels), want);
    assert!(want[200] >= 89_000);
    assert_eq!(level_histogram(&levels[..3]), {
        let mut h = vec![0u64; 256];
        levels[..3].iter().for_each(|&l| h[usize::from(l)] += 1);
        h
    });
    assert_eq!(level_histogram(&[]), vec![0u64; 256]);
}
