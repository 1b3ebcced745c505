//! `plexusctl`: the command line of the central API, in kubectl's manner.

pub mod apply;
pub mod columns;
pub mod commands;
pub mod config;
pub mod describe;
pub mod kinds;
pub mod manifest;
pub mod table;
pub mod usage;

use std::io::Write;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::{self, ApiError};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "plexusctl",
    version,
    about = "Manage Plexus networks, pools and attachments through plexusd"
)]
pub struct Cli {
    /// Namespace of namespaced objects (default: "default").
    #[arg(short, long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub connection: config::Flags,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or replace the objects in files, directories or stdin.
    Apply(ApplyArgs),
    /// List objects of a kind, or show one.
    Get(GetArgs),
    /// Show one object in detail.
    Describe(DescribeArgs),
    /// Delete objects by name or as named in files.
    Delete(DeleteArgs),
    /// Address management.
    #[command(subcommand)]
    Ipam(IpamCommand),
}

/// `apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A YAML or JSON file, a directory of them, or "-" for stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<String>,
}

/// `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The kind: plural, singular, short name or Kind (case-insensitive).
    pub kind: String,
    /// One object's name.
    pub name: Option<String>,
    /// List across all namespaces.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format (default: a table).
    #[arg(short, long, value_enum)]
    pub output: Option<GetFormat>,
    /// Label selector sent to the server (key=value).
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Attachments on this node only.
    #[arg(long)]
    pub node: Option<String>,
    /// Attachments to this network only (ns/name or name).
    #[arg(long)]
    pub network: Option<String>,
}

/// `describe`.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// The kind.
    pub kind: String,
    /// The object's name.
    pub name: String,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The kind.
    #[arg(required_unless_present = "files", conflicts_with = "files")]
    pub kind: Option<String>,
    /// Names of the objects.
    #[arg(required_unless_present = "files")]
    pub names: Vec<String>,
    /// Delete the objects a file, directory or stdin ("-") holds.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub files: Vec<String>,
    /// Absent objects are not an error.
    #[arg(long)]
    pub ignore_not_found: bool,
}

/// `ipam …`.
#[derive(Debug, Subcommand)]
pub enum IpamCommand {
    /// Blocks per node and addresses in use, of one pool or of all.
    Usage(UsageArgs),
}

/// `ipam usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The pool (default: every pool).
    pub pool: Option<String>,
    /// Print the raw IPPoolUsage objects.
    #[arg(short, long, value_enum)]
    pub output: Option<DataFormat>,
}

/// `get -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GetFormat {
    Json,
    Yaml,
    Wide,
}

/// `-o` where only data formats make sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataFormat {
    Json,
    Yaml,
}

/// A failure to report: a message, the causes under it, the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub message: String,
    pub causes: Vec<String>,
    pub code: i32,
}

impl Error {
    /// Exit code 1: an API error or bad input.
    pub fn new(message: impl Into<String>) -> Error {
        Error {
            message: message.into(),
            causes: Vec::new(),
            code: 1,
        }
    }

    /// Exit code 2: the command line makes no sense.
    pub fn usage(message: impl Into<String>) -> Error {
        Error {
            code: 2,
            ..Error::new(message)
        }
    }

    /// Failures already printed one by one: nothing more to say.
    pub fn reported() -> Error {
        Error::new("")
    }

    /// A client error in `context` ("apply x.yaml: ippool/p1"), with the server's causes.
    pub fn client(context: &str, e: &client::Error) -> Error {
        match e.api() {
            Some(api) => Error::api(context, api),
            None => Error::new(format!("{context}: {e}")),
        }
    }

    fn api(context: &str, e: &ApiError) -> Error {
        let causes = e
            .causes()
            .into_iter()
            .map(|(field, msg)| match field.as_str() {
                "" => msg,
                f => format!("{f}: {msg}"),
            })
            .collect();
        Error {
            causes,
            ..Error::new(format!("{context}: {e}"))
        }
    }

    /// Writes the error to stderr, if there is anything to write.
    pub fn print(&self) {
        if self.message.is_empty() {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "error: {}", self.message);
        for c in &self.causes {
            let _ = writeln!(err, "  {c}");
        }
    }
}

/// Runs a parsed command line; the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match commands::run(cli).await {
        Ok(()) => 0,
        Err(e) => {
            e.print();
            e.code
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) ends output quietly.
pub fn out(text: &str) -> Result<(), Error> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::new(format!("write stdout: {e}")))
        }
        _ => Ok(()),
    }
}
