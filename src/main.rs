//! The `udelta-gpu` binary: parses the command line and reports errors without panicking.
//! SIGINT/SIGTERM remove every output still being written before the process exits.

use clap::Parser;

fn main() {
    let cli = udelta_gpu::cli::Cli::parse();
    udelta_gpu::cli::install_signal_handlers();
    if let Err(e) = udelta_gpu::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
