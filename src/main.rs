//! The `udelta-gpu` binary: parses the command line and reports errors without panicking.
//! SIGINT/SIGTERM remove every output still being written before the process exits.

use clap::Parser;

fn main() {
    let cli = udelta_gpu::cli::Cli::parse();
    // A second signal during cleanup exits at once; outputs are staged, so nothing half-written
    // ever carries the final name.
    let _ = ctrlc::set_handler(|| {
        udelta_gpu::staging::remove_all_live();
        eprintln!("error: interrupted; partial outputs removed");
        std::process::exit(130);
    });
    if let Err(e) = udelta_gpu::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
