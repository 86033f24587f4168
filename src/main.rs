//! The `udelta-gpu` binary: parses the command line and reports errors without panicking.

use clap::Parser;

fn main() {
    let cli = udelta_gpu::cli::Cli::parse();
    if let Err(e) = udelta_gpu::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
