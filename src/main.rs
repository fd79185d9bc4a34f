//! The `tickfan` binary: parse the command line, load the config, then hand over to
//! `tickfan::run` (serve, on an already-bound listener) or `tickfan::import::run`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tickfan::Config;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gives memory mimalloc holds freed back to the OS now (after many idle connections parked,
/// their tasks' memory would otherwise stay resident for a while: about 140 B a connection).
fn release_memory() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

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
        /// Cluster mode: NATS JetStream URL, overriding [cluster] nats_url (docs/cluster.md).
        #[arg(long, value_name = "URL")]
        nats: Option<String>,
    },
    /// Bulk-load CSV or NDJSON ticks into the store of a server that is not running.
    Import {
        /// TOML config file (see config/default.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Store folder, overriding [store] dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Files to load: .csv (header row naming the tick fields), .ndjson or .jsonl.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let command = Cli::parse().command.unwrap_or(Cmd::Serve {
        config: None,
        listen: None,
        data_dir: None,
        no_simulator: false,
        nats: None,
    });
    match command {
        Cmd::Serve {
            config,
            listen,
            data_dir,
            no_simulator,
            nats,
        } => match load_config(config.as_deref(), data_dir) {
            Ok(mut cfg) => {
                if let Some(url) = nats {
                    cfg.cluster.nats_url = url;
                }
                if let Some(listen) = listen {
                    cfg.server.listen = listen;
                }
                if no_simulator {
                    cfg.feed.simulator = false;
                }
                serve(cfg)
            }
            Err(code) => code,
        },
        Cmd::Import {
            config,
            data_dir,
            files,
        } => match load_config(config.as_deref(), data_dir) {
            Ok(cfg) => import(&cfg, &files),
            Err(code) => code,
        },
    }
}

fn load_config(path: Option<&Path>, data_dir: Option<PathBuf>) -> Result<Config, ExitCode> {
    let mut cfg = path
        .map_or_else(|| Ok(Config::default()), Config::load)
        .map_err(|e| {
            eprintln!("tickfan: {e}");
            ExitCode::from(2)
        })?;
    if let Some(dir) = data_dir {
        cfg.store.dir = dir;
    }
    Ok(cfg)
}

fn serve(cfg: Config) -> ExitCode {
    tickfan::logging::init(&cfg.log);
    tickfan::transport::set_memory_release(release_memory);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tickfan: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match bind(cfg.server.listen, cfg.server.listen_backlog) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tickfan: cannot listen on {}: {e}", cfg.server.listen);
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => {
                let scheme = if cfg.server.tls_cert_file.is_some() {
                    "https"
                } else {
                    "http"
                };
                println!("listening on {scheme}://{addr}");
            }
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

/// Binds with the configured listen backlog (a plain `bind` gets a small fixed one).
fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

fn import(cfg: &Config, files: &[PathBuf]) -> ExitCode {
    use std::io::IsTerminal;
    tickfan::logging::init(&cfg.log);
    match tickfan::import::run(cfg, files, std::io::stderr().is_terminal()) {
        Ok(summary) => {
            for line in summary.report_lines() {
                println!("{line}");
            }
            if summary.failed_files.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("tickfan import: {e}");
            ExitCode::FAILURE
        }
    }
}
