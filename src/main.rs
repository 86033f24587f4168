//! The `udelta-gpu` binary: parses the command line and reports errors without panicking.
//! SIGINT/SIGTERM remove every output still being written before the process exits.

use clap::Parser;

fn main() {
    quiet_vulkan_device_select();
    let cli = udelta_gpu::cli::Cli::parse();
    udelta_gpu::cli::install_signal_handlers();
    if let Err(e) = udelta_gpu::cli::run(cli) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "error: {e}");
        std::process::exit(1);
    }
}

/// Turns off Mesa's implicit `VK_LAYER_MESA_device_select` Vulkan layer unless the user set
/// `NODEVICE_SELECT` themselves. That layer only reorders the adapters for applications that take
/// the first one (this tool ranks them itself), and on a server without a desktop session it
/// probes for a Wayland display and prints `error: XDG_RUNTIME_DIR is invalid or not set in the
/// environment.` twice per run, which reads like a failure. Called first thing in `main`, while
/// the process has a single thread (no other thread can be reading the environment).
fn quiet_vulkan_device_select() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}
