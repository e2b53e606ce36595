//! The `bitnet-pack` binary: parse the command line, run, map errors to exit code 2.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with code 2.
    let cli = bitnet_pack::cli::Cli::parse();
    // Ctrl-C, SIGTERM and SIGHUP remove the temporary file of an output being written.
    bitnet_pack::fsio::install_interrupt_cleanup();
    match bitnet_pack::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "error: {}",
                bitnet_pack::cli::escape_controls(&format!("{e:#}"))
            );
            ExitCode::from(bitnet_pack::cli::EXIT_ERROR)
        }
    }
}
