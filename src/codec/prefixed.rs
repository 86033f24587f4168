//! Lossless coding of a side file (config, tokenizer, ...) against the base's file of the same
//! path: one zstd frame whose matches may reach back into the base's bytes (a zstd "prefix",
//! as `zstd --patch-from` uses), or into nothing when the base has no such file.
//!
//! The frame is single-threaded with a fixed level and a window that covers the prefix and the
//! data, so the bytes depend only on the two inputs. Sizes are capped by the caller
//! ([`crate::checkpoint::side_files::MAX_SIDE_FILE_LEN`]), which bounds the window.

use zstd_safe::{CCtx, CParameter, DCtx, DParameter};

/// zstd level (the highest before the "ultra" levels, whose larger tables cost memory; on the
/// MiniLM side files `zstd` alone at 22 saves 2 bytes over 19, docs/FORMAT.md).
pub const LEVEL: i32 = 19;

/// Largest window (2^27 = 128 MiB): a 64 MiB prefix plus 64 MiB of data.
pub const MAX_WINDOW_LOG: u32 = 27;

/// Smallest window zstd accepts.
const MIN_WINDOW_LOG: u32 = 10;

/// The window log that lets the frame reach the whole prefix: `ceil(log2(prefix + data))`.
fn window_log(prefix_len: usize, data_len: usize) -> u32 {
    let span = (prefix_len + data_len).max(1) as u64;
    let log = 64 - (span - 1).leading_zeros();
    log.clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG)
}

fn zstd_error(what: &str, code: usize) -> String {
    format!("{what}: {}", zstd_safe::get_error_name(code))
}

/// The longest frame [`encode`] makes of `len` bytes (zstd's bound): a longer record is refused
/// before it is read.
pub fn max_frame_len(len: u64) -> u64 {
    zstd_safe::compress_bound(len as usize) as u64
}

/// Codes `data` against `prefix` (empty: no base file). Deterministic.
pub fn encode(prefix: &[u8], data: &[u8]) -> Result<Vec<u8>, String> {
    let mut cctx = CCtx::try_create().ok_or("zstd: out of memory")?;
    let params = [
        CParameter::CompressionLevel(LEVEL),
        CParameter::WindowLog(window_log(prefix.len(), data.len())),
        CParameter::ContentSizeFlag(true),
        CParameter::ChecksumFlag(false),
    ];
    for p in params {
        cctx.set_parameter(p)
            .map_err(|c| zstd_error("zstd parameter", c))?;
    }
    if !prefix.is_empty() {
        cctx.ref_prefix(prefix)
            .map_err(|c| zstd_error("zstd prefix", c))?;
    }
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data)
        .map_err(|c| zstd_error("zstd", c))?;
    Ok(out)
}

/// Decodes a frame made by [`encode`] with the same `prefix`; the result must be exactly `len`
/// bytes (at most `len` are ever allocated).
pub fn decode(prefix: &[u8], frame: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let mut dctx = DCtx::try_create().ok_or("zstd: out of memory")?;
    dctx.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
        .map_err(|c| zstd_error("zstd parameter", c))?;
    if !prefix.is_empty() {
        dctx.ref_prefix(prefix)
            .map_err(|c| zstd_error("zstd prefix", c))?;
    }
    let mut out = Vec::with_capacity(len);
    dctx.decompress(&mut out, frame)
        .map_err(|c| zstd_error("undecodable", c))?;
    if out.len() != len {
        return Err(format!("decodes to {} bytes, {len} expected", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text with repeats, like a config or a tokenizer.
    fn text(n: usize, salt: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| format!("\"tok{}\": {},\n", (i * 7919 + salt) % 5003, i))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn round_trips_with_and_without_a_prefix() {
        let base = text(20_000, 1);
        let mut ft = base.clone();
        ft.extend_from_slice(b"\"added_token\": 1\n");
        for prefix in [&base[..], &[][..]] {
            let frame = encode(prefix, &ft).unwrap();
            assert!(frame.len() as u64 <= max_frame_len(ft.len() as u64));
            assert_eq!(decode(prefix, &frame, ft.len()).unwrap(), ft);
        }
        let empty = encode(&base, b"").unwrap();
        assert_eq!(decode(&base, &empty, 0).unwrap(), b"");
    }

    #[test]
    fn the_prefix_pays_for_a_near_copy() {
        let base = text(20_000, 1);
        let mut ft = base.clone();
        ft[1000] = b'X';
        let against = encode(&base, &ft).unwrap().len();
        let alone = encode(&[], &ft).unwrap().len();
        // A one-byte change of a file the decoder already has: a few dozen bytes.
        assert!(against < 100, "{against} bytes");
        assert!(alone > 20 * against, "{alone} vs {against}");
    }

    #[test]
    fn wrong_prefix_length_or_garbage_is_refused() {
        let base = text(5_000, 1);
        let ft = text(5_000, 2);
        let frame = encode(&base, &ft).unwrap();
        assert!(decode(&base, &frame, ft.len() - 1).is_err());
        assert!(decode(&base, &frame, ft.len() + 1).is_err());
        assert!(decode(&base, &frame[..frame.len() / 2], ft.len()).is_err());
        assert!(decode(&base, b"not a zstd frame", ft.len()).is_err());
        // A different prefix decodes to other bytes (the caller's CRC-32 refuses them) or fails.
        let other = text(5_000, 3);
        assert!(decode(&other, &frame, ft.len()).map_or(true, |d| d != ft));
    }

    #[test]
    fn window_covers_prefix_and_data() {
        assert_eq!(window_log(0, 0), MIN_WINDOW_LOG);
        assert_eq!(window_log(1 << 20, 1 << 20), 21);
        assert_eq!(window_log((1 << 20) + 1, 1 << 20), 22);
        assert_eq!(window_log(64 << 20, 64 << 20), MAX_WINDOW_LOG);
    }
}
