//! The `shoal` binary: parses the command line and hands over to `cli`.

use clap::Parser;

fn main() {
    if let Err(e) = shoal::cli::run(shoal::cli::Cli::parse()) {
        eprintln!("shoal: {e:#}");
        std::process::exit(1);
    }
}
