//! The `bitnet-pack` binary: parse the command line, run, map errors to exit code 2.

use std::process::ExitCode;

use clap::Parser;

/// Longest error message printed whole.
const MAX_MESSAGE: usize = 2000;

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with code 2.
    let cli = bitnet_pack::cli::Cli::parse();
    // Ctrl-C, SIGTERM and SIGHUP remove the temporary file of an output being written.
    bitnet_pack::fsio::install_interrupt_cleanup();
    match bitnet_pack::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Very long messages (a hostile file's 100 KB tensor name) are cut.
            let mut text = format!("{e:#}");
            if text.len() > MAX_MESSAGE {
                let cut = (0..=MAX_MESSAGE)
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                let more = text.len() - cut;
                text.truncate(cut);
                text.push_str(&format!("... ({more} more bytes)"));
            }
            bitnet_pack::cli::say(&format!("error: {text}"));
            ExitCode::from(bitnet_pack::cli::EXIT_ERROR)
        }
    }
}
