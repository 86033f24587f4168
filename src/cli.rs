//! The command line: `compress`, `decompress`, `inspect`, `synth`, `demo`.

use crate::algorithm::CompressParams;
use crate::checkpoint::dtype::FloatType;
use crate::checkpoint::reader::Checkpoint;
use crate::checkpoint::select::{Embeddings, TensorSelector};
use crate::checkpoint::side_files::SideFileOptions;
use crate::engine::{self, Engine};
use crate::error::{Error, Result};
use crate::format::UdeltaReader;
use crate::pipeline::compress::{
    compress, compress_staged, dry_run, CompressOptions, DryRunReport, SizeTarget, StagedCompress,
    TargetOutcome,
};
use crate::pipeline::decompress::{decompress, decompress_staged, DecompressOptions};
use crate::pipeline::verify::verify;
use crate::report::InspectReport;
use crate::synth::{write_synthetic, Preset, SynthOptions};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `println!` for the tool's results: a closed stdout (`udelta-gpu inspect f | head`) ends the
/// process quietly with status 0 instead of panicking; any other failure to write is an error
/// on stderr with status 1.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::emit(format_args!($($arg)*))
    };
}

/// Writes one line of results to stdout (see [`out!`]).
pub fn emit(args: std::fmt::Arguments) {
    use std::io::Write as _;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{args}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Writes a whole result (the report of a run whose outputs are still staged) to stdout: a
/// reader that went away (a closed pipe) is not a failure of the run, any other failure to
/// write (a full disk behind `>`) is, and the run then commits nothing.
fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::Param(format!("writing the report to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

/// `eprintln!` for progress notes: a failure to write them (stderr closed or full) neither
/// panics nor fails the run.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Makes signals end the process cleanly: SIGINT, SIGTERM and SIGHUP remove every output still
/// being written (outputs are staged, so nothing half-written ever carries the final name) and
/// exit with status 130; SIGXFSZ (a file-size limit, `ulimit -f`) is ignored, so the write
/// that exceeds the limit fails with an error naming the file and the run cleans up after itself
/// instead of being killed with its temporary left behind.
pub fn install_signal_handlers() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let _ = ctrlc::set_handler(|| {
        crate::staging::remove_all_live_and_exit(130, "error: interrupted; partial outputs removed")
    });
}

/// UltraDelta compression of fine-tuned LLM weight deltas, on the GPU (wgpu) or the CPU.
#[derive(Debug, Parser)]
#[command(name = "udelta-gpu", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compress the delta between a fine-tuned checkpoint and its base into a .udelta file.
    Compress(CompressArgs),
    /// Rebuild the fine-tuned checkpoint (or only its deltas) from a .udelta file and the base.
    Decompress(DecompressArgs),
    /// Show what a .udelta file holds: per-tensor sizes, totals, measured and paper ratios.
    Inspect(InspectArgs),
    /// Write LLaMA-shaped synthetic base and fine-tuned checkpoints (for tests and benchmarks).
    Synth(SynthArgs),
    /// Synthesize a tiny model, compress, decompress, verify, and print the report.
    Demo(DemoArgs),
    /// List the GPU adapters wgpu sees (name, backend, type, driver, limits).
    Adapters(AdaptersArgs),
    /// Trace-norm rescaling across .udelta files of one base compressed separately (each with
    /// --trace-norm): recomputes gamma from their stored trace norms, rewriting only metadata.
    Rescale(RescaleArgs),
}

/// `compress` arguments.
#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct CompressArgs {
    /// Base checkpoint: a .safetensors file or an HF directory (single file or shards).
    #[arg(long)]
    pub base: PathBuf,
    /// Fine-tuned checkpoint, laid out like the base; repeat for several fine-tunes of one base
    /// (compressed together, with trace-norm rescaling across them).
    #[arg(long, required = true)]
    pub finetuned: Vec<PathBuf>,
    /// Output .udelta file; with several --finetuned, a directory receiving NAME.udelta each.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Target sparsity s (fraction of delta entries pruned), in (0, 1).
    #[arg(long, default_value_t = 0.95)]
    pub sparsity: f64,
    /// Choose the sparsity so that the file takes about this size (e.g. 25MB, 1GiB), from the
    /// level histograms of pass 1; instead of --sparsity.
    #[arg(long, value_parser = parse_size, conflicts_with_all = ["sparsity", "target_ratio"])]
    pub target_size: Option<u64>,
    /// Choose the sparsity so that the whole-file ratio (the fine-tune's tensor bytes over the
    /// file's bytes, ratio_file) is about R; instead of --sparsity.
    #[arg(long, value_name = "R", conflicts_with = "sparsity")]
    pub target_ratio: Option<f64>,
    /// Print the plan (what is compressed, stored, compared; parameter counts; the expected
    /// file size and its error bound) from the headers and a small sample of the data, and
    /// write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Quantization bits, 1..=8.
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Sparsity step between the low/middle/high variance groups.
    #[arg(long, default_value_t = 0.01)]
    pub step: f64,
    /// Additional rescale factor a (kept values are scaled by a / (1 - s)).
    #[arg(long, default_value_t = 1.0)]
    pub factor: f64,
    /// Seed of the selection hash.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute engine: auto (best GPU, else CPU), vulkan, metal, dx12, gl or cpu.
    #[arg(long, default_value = "auto")]
    pub adapter: String,
    /// Device memory the GPU engine may allocate (e.g. 1GiB, 512MiB, 300MB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub gpu_mem: u64,
    /// Compress exactly the tensors whose names match this regex (default: transformer-block linear weights).
    #[arg(long)]
    pub include: Option<String>,
    /// Never compress tensors whose names match this regex.
    #[arg(long)]
    pub exclude: Option<String>,
    /// Embedding-like tables (embed_tokens, lm_head, word/position embeddings, ...): lossy
    /// (UltraDelta, one allocation with the block linears), lossless (stored exactly), or
    /// separate (UltraDelta, an allocation of their own).
    #[arg(long, default_value = "lossy")]
    pub embeddings: String,
    /// Model name used in the selection hash (default: the fine-tuned path's last component).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Recompute every tensor on the CPU reference engine and fail on any difference.
    #[arg(long)]
    pub verify: bool,
    /// Estimate the trace norm T_m and store it (automatic with several --finetuned; needed to
    /// `rescale` files compressed separately).
    #[arg(long)]
    pub trace_norm: bool,
    /// Use this gamma for every model instead of the trace-norm rule.
    #[arg(long)]
    pub gamma: Option<f64>,
    /// Carry none of the fine-tuned directory's other files (config, tokenizer, ...); by
    /// default they travel in the file, coded against the base's, and decompress restores them.
    #[arg(long)]
    pub no_side_files: bool,
    /// Also carry the directory's Python files (modeling_*.py for trust_remote_code).
    #[arg(long, conflicts_with = "no_side_files")]
    pub with_remote_code: bool,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `decompress` arguments.
#[derive(Debug, Args)]
pub struct DecompressArgs {
    /// The .udelta file.
    pub input: PathBuf,
    /// The base checkpoint it was made against.
    #[arg(long)]
    pub base: PathBuf,
    /// Output directory (must not exist unless --force).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write only the reconstructed deltas of the compressed tensors, as f32 (DIR/model.safetensors).
    #[arg(long)]
    pub delta_only: bool,
    /// Replace an existing output and apply to a base whose checksums differ.
    #[arg(long)]
    pub force: bool,
    /// No progress bars.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `inspect` arguments.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The .udelta file.
    pub input: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Totals only, no per-tensor table.
    #[arg(long)]
    pub totals: bool,
    /// Also draw the pruning rate, delta std and bytes stored per block and matrix into this
    /// SVG file (replaced if it exists).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// `synth` arguments.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory (gets base/ and ft-1/ .. ft-M/).
    #[arg(long)]
    pub out: PathBuf,
    /// Shapes: tiny, 7b or 13b (LLaMA-2), llama3-8b (Llama-3-8B, GQA), mistral-7b,
    /// mixtral-8x7b, qwen3-moe (Qwen3-30B-A3B, fused 3-D experts), phi3-mini, gemma2-2b,
    /// deepseek-v2-lite.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Override the number of transformer layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Divide every size (widths, vocabulary, head dimension; not the counts of layers, heads
    /// or experts) by N, keeping every tensor name: small checkpoints of a family.
    #[arg(long, default_value_t = 1)]
    pub shrink: usize,
    /// Element type: f16, bf16 or f32 (default: the preset's: f16 for tiny, 7b and 13b, f32
    /// for gemma2-2b, else bf16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Number of fine-tunes.
    #[arg(long, default_value_t = 1)]
    pub models: usize,
    /// Number of shard files per checkpoint (default: the preset's).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra vocabulary rows in the fine-tunes.
    #[arg(long, default_value_t = 0)]
    pub vocab_growth: usize,
    /// Replace existing base/ and ft-N/ directories under --out.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Target sparsity.
    #[arg(long, default_value_t = 0.95)]
    pub sparsity: f64,
    /// Compute engine (see compress --adapter).
    #[arg(long, default_value = "auto")]
    pub adapter: String,
}

/// `rescale` arguments.
#[derive(Debug, Args)]
pub struct RescaleArgs {
    /// The .udelta files (fine-tunes of one base).
    #[arg(required = true, num_args = 2..)]
    pub files: Vec<PathBuf>,
}

/// `adapters` arguments.
#[derive(Debug, Args)]
pub struct AdaptersArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses a byte size: a number with an optional unit (B, K/KB, KiB, M/MB, MiB, G/GB, GiB).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 1GiB, 512MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit '{other}' in '{text}'")),
    };
    let bytes = value * mult as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("'{text}' is not a positive size"));
    }
    Ok(bytes as u64)
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Compress(a) => {
            let output = a.output.clone();
            run_compress(a).map_err(|e| e.for_output(output))
        }
        Command::Decompress(a) => {
            let opts = DecompressOptions {
                delta_only: a.delta_only,
                force: a.force,
                progress: !a.quiet,
            };
            let t = Instant::now();
            let staged = decompress_staged(&a.input, &a.base, &a.output, &opts)
                .map_err(|e| e.for_output(&a.output))?;
            crate::staging::committing();
            staged.commit()?;
            note!(
                "wrote {} in {:.2} s",
                a.output.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Inspect(a) => {
            let reader = UdeltaReader::open(&a.input)?;
            if let Some(svg) = &a.plot {
                crate::plot::write_plot(&reader, &a.input, svg)?;
                eprintln!("wrote {}", svg.display());
            }
            print_report(&InspectReport::of(&reader), a.json, !a.totals)
        }
        Command::Synth(a) => {
            let out = a.out.clone();
            run_synth(a).map_err(|e| e.for_output(out))
        }
        Command::Demo(a) => run_demo(a),
        Command::Rescale(a) => {
            let staged = crate::pipeline::rescale::stage_rescale(&a.files)?;
            let lines: String = a
                .files
                .iter()
                .zip(&staged.gammas)
                .map(|(f, g)| format!("{}  gamma {g:.6}\n", f.display()))
                .collect();
            write_stdout(&lines)?;
            crate::staging::committing();
            staged.commit()
        }
        Command::Adapters(a) => {
            let list = engine::gpu::list_adapters();
            if a.json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&list).map_err(|e| Error::Param(e.to_string()))?
                );
            } else if list.is_empty() {
                out!("wgpu sees no adapter (install a Vulkan driver, e.g. mesa-vulkan-drivers for lavapipe)");
            } else {
                for ad in &list {
                    out!("{}", ad.summary());
                    out!("    driver: {} {}", ad.driver, ad.driver_info);
                    out!(
                        "    max storage binding {} B, max buffer {} B, max workgroups/dim {}, max invocations/workgroup {}",
                        ad.max_storage_buffer_binding_size, ad.max_buffer_size, ad.max_compute_workgroups_per_dimension, ad.max_compute_invocations_per_workgroup
                    );
                }
            }
            Ok(())
        }
    }
}

fn print_report(report: &InspectReport, json: bool, per_tensor: bool) -> Result<()> {
    out!("{}", report_text(report, json, per_tensor)?);
    Ok(())
}

/// A report as JSON or text, without a final newline.
fn report_text(report: &InspectReport, json: bool, per_tensor: bool) -> Result<String> {
    Ok(if json {
        serde_json::to_string_pretty(report).map_err(|e| Error::Param(e.to_string()))?
    } else {
        report
            .to_text(per_tensor)
            .trim_end_matches('\n')
            .to_string()
    })
}

fn run_compress(a: CompressArgs) -> Result<()> {
    let params = CompressParams {
        sparsity: a.sparsity,
        bits: a.bits,
        step: a.step,
        factor: a.factor,
        seed: a.seed,
    };
    params.validate()?;
    let opts = CompressOptions {
        params,
        selector: TensorSelector::new(a.include.as_deref(), a.exclude.as_deref())?
            .with_embeddings(a.embeddings.parse::<Embeddings>()?),
        model_name: a.model_name,
        force: a.force,
        verify: a.verify,
        progress: !a.quiet,
        trace_norm: a.trace_norm,
        gamma: a.gamma,
        side_files: SideFileOptions {
            omit: a.no_side_files,
            remote_code: a.with_remote_code,
        },
        target: match (a.target_size, a.target_ratio) {
            (Some(bytes), _) => Some(SizeTarget::Bytes(bytes)),
            (None, Some(r)) => Some(SizeTarget::Ratio(r)),
            (None, None) => None,
        },
    };
    if a.dry_run {
        return print_dry_run(&dry_run(&a.base, &a.finetuned, &a.output, &opts)?, a.json);
    }
    let mut engine = engine::create(&a.adapter, a.gpu_mem)?;
    let t = Instant::now();
    let staged = compress_staged(&a.base, &a.finetuned, &a.output, &opts, engine.as_mut())?;
    let secs = t.elapsed().as_secs_f64();
    let reports = staged
        .files()
        .iter()
        .map(|(f, _)| Ok(InspectReport::of(&UdeltaReader::open(f)?)))
        .collect::<Result<Vec<_>>>()?;
    if !a.json {
        note_compress_times(&reports, secs, &staged.times, a.verify, &staged.engine);
    }
    let names: Vec<PathBuf> = match reports.len() {
        1 => vec![a.output.clone()],
        _ => staged
            .files()
            .iter()
            .map(|(f, _)| a.output.join(f.file_name().unwrap_or_default()))
            .collect(),
    };
    write_stdout(&compress_report(&reports, &names, a.json, &staged)?)?;
    crate::staging::committing();
    staged.commit()?;
    Ok(())
}

/// What `compress` prints on stdout: each file's report (JSON: one object, or an array, each
/// with the run's counters under `run`).
fn compress_report(
    reports: &[InspectReport],
    names: &[PathBuf],
    json: bool,
    staged: &StagedCompress,
) -> Result<String> {
    let target = staged.target.as_ref().filter(|_| reports.len() == 1);
    if json {
        let mut reports = with_run_counters(reports, staged)?;
        if let (Some(t), [v]) = (target, reports.as_mut_slice()) {
            v["target"] = target_json(t, v["file_bytes"].as_u64().unwrap_or(0));
        }
        let value = match reports.as_slice() {
            [one] => one,
            _ => &serde_json::Value::Array(reports.clone()),
        };
        let text = serde_json::to_string_pretty(value).map_err(|e| Error::Param(e.to_string()))?;
        return Ok(text + "\n");
    }
    let mut text = String::new();
    for (r, f) in reports.iter().zip(names) {
        if !json && reports.len() > 1 {
            text += &format!("== {}\n", f.display());
        }
        text += &report_text(r, json, false)?;
        text.push('\n');
    }
    if let (Some(t), [r]) = (target, reports) {
        text += &target_line(t, r);
    }
    Ok(text)
}

/// The speed and stage-time lines `compress` prints on stderr.
fn note_compress_times(
    reports: &[InspectReport],
    secs: f64,
    t: &crate::pipeline::compress::StageTimes,
    verify: bool,
    engine: &str,
) {
    let params: u64 = reports.iter().map(|r| r.compressed_params).sum();
    note!(
        "compressed {params} params in {secs:.2} s ({:.1} M params/s) on {engine}",
        params as f64 / secs / 1e6,
    );
    note!(
        "stages (s): read {:.2}  compare {:.2}  analyze {:.2}  select {:.2}  trace norm {:.2}  encode {:.2}  write {:.2}{}{}  (read: pass 1 {:.2}, pass 2 {:.2})",
        t.read + t.read_pass2,
        t.compare,
        t.analyze,
        t.select,
        t.trace_norm,
        t.encode,
        t.write,
        if verify { format!("  verify {:.2}", t.verify) } else { String::new() },
        if t.trace_norm_wait > 0.0 {
            format!("  (trace norm on its own thread; final wait {:.2})", t.trace_norm_wait)
        } else {
            String::new()
        },
        t.read,
        t.read_pass2
    );
}

/// Each file's report as JSON with the whole run's counters and stage times under `run`
/// (the same object in every file's report when several fine-tunes were compressed).
fn with_run_counters(
    reports: &[InspectReport],
    out: &StagedCompress,
) -> Result<Vec<serde_json::Value>> {
    let json = |e: serde_json::Error| Error::Param(e.to_string());
    let mut run = serde_json::to_value(&out.counters).map_err(json)?;
    run["seconds"] = serde_json::to_value(&out.times).map_err(json)?;
    reports
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).map_err(json)?;
            v["run"] = run.clone();
            Ok(v)
        })
        .collect()
}

/// The dry run's plan, as text or JSON.
fn print_dry_run(report: &DryRunReport, json: bool) -> Result<()> {
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(report).map_err(|e| Error::Param(e.to_string()))?
        );
    } else {
        out!("{}", report.to_text().trim_end_matches('\n'));
    }
    Ok(())
}

/// What a target size chose and reached, for the JSON report (`target`).
fn target_json(target: &TargetOutcome, reached: u64) -> serde_json::Value {
    serde_json::json!({
        "target_bytes": target.target_bytes,
        "sparsity": target.sparsity,
        "estimated_bytes": target.estimated_bytes,
        "file_bytes": reached,
        "off_percent": off_percent(target, reached),
    })
}

/// The text report's last line for a file compressed to a target size.
fn target_line(target: &TargetOutcome, report: &InspectReport) -> String {
    let reached = report.file_bytes;
    format!(
        "target {} bytes: sparsity {:.6} chosen (expected {} bytes); file {} bytes ({:+.2} %), ratio_file {:.2}x\n",
        target.target_bytes,
        target.sparsity,
        target.estimated_bytes,
        reached,
        off_percent(target, reached),
        report.ratio_file
    )
}

/// How far the file's size is from the target, in percent.
fn off_percent(target: &TargetOutcome, reached: u64) -> f64 {
    100.0 * (reached as f64 / target.target_bytes as f64 - 1.0)
}

fn parse_float_type(s: &str) -> Result<FloatType> {
    match s {
        "f16" => Ok(FloatType::F16),
        "bf16" => Ok(FloatType::BF16),
        "f32" => Ok(FloatType::F32),
        other => Err(Error::Param(format!(
            "--dtype {other}: expected f16, bf16 or f32"
        ))),
    }
}

fn run_synth(a: SynthArgs) -> Result<()> {
    let preset = a.preset.parse::<Preset>()?;
    let opts = SynthOptions {
        preset,
        layers: a.layers,
        dtype: match &a.dtype {
            Some(d) => parse_float_type(d)?,
            None => preset.default_dtype(),
        },
        models: a.models,
        shards: a.shards,
        seed: a.seed,
        vocab_growth: a.vocab_growth,
        replace: a.force,
        shrink: a.shrink,
    };
    let t = Instant::now();
    let progress = crate::progress::Progress::new("synth", 0, !a.quiet);
    let report = write_synthetic(&a.out, &opts, &|done, total| {
        progress.set(done, total);
    })?;
    progress.finish();
    eprintln!(
        "wrote {} and {} fine-tune(s) of {} params ({} bytes each) in {:.2} s",
        report.base.display(),
        report.finetuned.len(),
        report.params_per_model,
        report.bytes_per_model,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_demo(a: DemoArgs) -> Result<()> {
    let tmp;
    let dir: &Path = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            d
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
            tmp.path()
        }
    };
    let synth_dir = dir.join("synth");
    out!(
        "1. synthesizing a tiny LLaMA-shaped base and fine-tune in {}",
        synth_dir.display()
    );
    let opts = SynthOptions {
        preset: Preset::Tiny,
        layers: None,
        dtype: FloatType::F16,
        models: 1,
        shards: None,
        seed: 0,
        vocab_growth: 0,
        replace: true,
        shrink: 1,
    };
    let _ = std::fs::remove_dir_all(&synth_dir);
    let syn = write_synthetic(&synth_dir, &opts, &|_, _| {})?;
    let ft = &syn.finetuned[0];
    let file = dir.join("ft-1.udelta");
    let _ = std::fs::remove_file(&file);
    let mut engine: Box<dyn Engine> = engine::create(&a.adapter, engine::gpu::DEFAULT_GPU_MEM)?;
    out!(
        "2. compressing with UltraDelta (s = {}, 4 bits) on {}",
        a.sparsity,
        engine.name()
    );
    let params = CompressParams {
        sparsity: a.sparsity,
        ..Default::default()
    };
    let copts = CompressOptions {
        params,
        selector: TensorSelector::new(None, None)?,
        force: true,
        ..Default::default()
    };
    let t = Instant::now();
    compress(
        &syn.base,
        std::slice::from_ref(ft),
        &file,
        &copts,
        engine.as_mut(),
    )?;
    out!("   done in {:.3} s", t.elapsed().as_secs_f64());
    let restored = dir.join("restored");
    let _ = std::fs::remove_dir_all(&restored);
    out!("3. decompressing into {}", restored.display());
    decompress(
        &file,
        &syn.base,
        &restored,
        &DecompressOptions {
            delta_only: false,
            force: false,
            progress: false,
        },
    )?;
    out!("4. verifying against the original fine-tune");
    let reader = UdeltaReader::open(&file)?;
    let v = verify(
        &reader,
        &Checkpoint::open(&syn.base)?,
        &Checkpoint::open(ft)?,
        &Checkpoint::open(&restored)?,
    )?;
    out!(
        "   {} tensors bit-exact, {} compressed: {} of {} entries changed ({:.2}%), delta cosine similarity {:.3}",
        v.exact_tensors,
        v.compressed_tensors,
        v.changed_elements,
        v.compressed_elements,
        100.0 * v.changed_elements as f64 / v.compressed_elements.max(1) as f64,
        v.delta_cosine
    );
    out!("5. report");
    out!(
        "{}",
        InspectReport::of(&reader)
            .to_text(true)
            .trim_end_matches('\n')
    );
    Ok(())
}
