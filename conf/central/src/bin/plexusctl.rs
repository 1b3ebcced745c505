//! plexusctl: the command line of the Plexus central API (`plexusd`).

use clap::Parser;

use plexus_central::ctl::{self, Cli};

fn main() {
    // Usage errors exit 2 here, inside clap.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(ctl::run(cli));
    std::process::exit(code);
}
