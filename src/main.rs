//! The `tickfan` binary: parse the command line, load the config, bind, and hand over to
//! `tickfan::run` (serve) or the importer.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tickfan::Config;

#[derive(Parser)]
#[command(
    name = "tickfan",
    version,
    about = "WebSocket real-time market-data fan-out server"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (the default).
    Serve {
        /// TOML config file (see config/default.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, overriding [server] listen (port 0 picks a free port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Store folder, overriding [store] dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Do not run the built-in market simulator.
        #[arg(long)]
        no_simulator: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Cmd::Serve {
        config: None,
        listen: None,
        data_dir: None,
        no_simulator: false,
    });
    match command {
        Cmd::Serve {
            config,
            listen,
            data_dir,
            no_simulator,
        } => {
            let mut cfg = match config
                .as_deref()
                .map_or_else(|| Ok(Config::default()), Config::load)
            {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("tickfan: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(listen) = listen {
                cfg.server.listen = listen;
            }
            if let Some(dir) = data_dir {
                cfg.store.dir = dir;
            }
            if no_simulator {
                cfg.feed.simulator = false;
            }
            serve(cfg)
        }
    }
}

fn serve(cfg: Config) -> ExitCode {
    tickfan::logging::init(&cfg.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tickfan: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(cfg.server.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tickfan: cannot listen on {}: {e}", cfg.server.listen);
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => println!("listening on http://{addr}"),
            Err(e) => {
                eprintln!("tickfan: {e}");
                return ExitCode::FAILURE;
            }
        }
        match tickfan::run(listener, cfg, tickfan::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tickfan: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
