//! plexusd: the central API server. Flags are named as kube-apiserver names them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use plexus_central::server::{self, store::EtcdFlags, Config};

#[derive(Parser, Debug)]
#[command(name = "plexusd", version, about = "Plexus central API server")]
struct Flags {
    /// etcd members, comma-separated URLs.
    #[arg(long, value_delimiter = ',', required = true)]
    etcd_servers: Vec<String>,
    /// CA that signed the etcd members' certificates.
    #[arg(long)]
    etcd_cafile: Option<String>,
    /// Client certificate for etcd.
    #[arg(long)]
    etcd_certfile: Option<String>,
    /// Client key for etcd.
    #[arg(long)]
    etcd_keyfile: Option<String>,
    /// Address to serve on; plain HTTP only on a loopback address.
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: IpAddr,
    /// Port to serve on.
    #[arg(long, default_value_t = 6443)]
    secure_port: u16,
    /// Server certificate (PEM).
    #[arg(long)]
    tls_cert_file: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    tls_private_key_file: Option<PathBuf>,
    /// Static token file: token,user,uid,"group1,group2".
    #[arg(long)]
    token_auth_file: PathBuf,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 3 * 1024 * 1024)]
    max_request_bytes: usize,
    /// Longest a request (other than a watch) may take, in seconds.
    #[arg(long, default_value_t = 60)]
    request_timeout: u64,
    /// CNI plugin types nodes have beyond the built-in and reference ones.
    #[arg(long, value_delimiter = ',')]
    cni_types: Vec<String>,
    /// Seconds a node's Node object must stay gone (its agent's lease
    /// expired, or an admin deleted it) before its addresses are reclaimed.
    #[arg(long, default_value_t = 300)]
    node_grace_period: u64,
    /// Seconds between looks for gone nodes.
    #[arg(long, default_value_t = 5)]
    node_monitor_period: u64,
    /// Log level: error, warn, info, debug.
    #[arg(long, default_value = "info")]
    v: String,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let level = flags.v.parse().unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    let tls = match (flags.tls_cert_file, flags.tls_private_key_file) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            eprintln!("plexusd: --tls-cert-file and --tls-private-key-file go together");
            return ExitCode::from(2);
        }
    };
    let config = Config {
        etcd: EtcdFlags {
            servers: flags.etcd_servers,
            ca_file: flags.etcd_cafile,
            cert_file: flags.etcd_certfile,
            key_file: flags.etcd_keyfile,
        },
        bind: SocketAddr::new(flags.bind_address, flags.secure_port),
        tls,
        token_file: flags.token_auth_file,
        extra_types: flags.cni_types,
        max_body: flags.max_request_bytes,
        request_timeout: Duration::from_secs(flags.request_timeout.max(1)),
        node_grace: Duration::from_secs(flags.node_grace_period),
        node_monitor: Duration::from_secs(flags.node_monitor_period.max(1)),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plexusd: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plexusd: {e}");
            ExitCode::FAILURE
        }
    }
}
