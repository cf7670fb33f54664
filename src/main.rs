//! The `sigil` binary: parse the command line, set up logging, run the verb.

use clap::Parser;
use tracing_subscriber::{fmt, EnvFilter};

fn main() {
    let cli = sigil::cli::Cli::parse();
    let filter = EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sigil: cannot start the runtime: {e}");
            std::process::exit(sigil::cli::exit::FAILURE);
        }
    };
    let code = rt.block_on(sigil::cli::run(cli));
    std::process::exit(code);
}
