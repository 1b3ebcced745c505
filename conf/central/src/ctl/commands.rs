//! Each subcommand: read the command line, ask the server, print.

use serde_json::{json, Value};

use conf::api::{Kind, ATTACHMENT, IP_POOL};

use super::apply;
use super::columns::{self, Layout};
use super::kinds::{self, label, name, text};
use super::{config, describe, manifest, out, table, usage};
use super::{
    Cli, Command, DataFormat, DeleteArgs, Error, GetArgs, GetFormat, IpamCommand, UsageArgs,
};
use crate::client::Client;

/// The label nodes put on their attachments.
pub const NODE_LABEL: &str = "plexus.io/node";

/// Runs one command line.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let connect =
        || config::resolve(&cli.connection, &|k| std::env::var(k).ok()).and_then(|c| c.client());
    let ns = cli.namespace.as_deref();
    match &cli.command {
        Command::Apply(a) => {
            let ms = manifest::load(&a.files, &mut std::io::stdin().lock())?;
            if ms.is_empty() {
                return Err(Error::new(format!("no objects in {}", shown(&a.files))));
            }
            apply::apply(&connect()?, &ms, ns).await
        }
        Command::Get(g) => {
            // A mistyped kind is reported before any connection problem.
            kinds::resolve(&g.kind)?;
            get(&connect()?, g, ns).await
        }
        Command::Describe(d) => {
            let kind = kinds::resolve(&d.kind)?;
            describe_one(&connect()?, kind, &d.name, ns).await
        }
        Command::Delete(d) => delete(connect, d, ns).await,
        Command::Ipam(IpamCommand::Usage(u)) => ipam_usage(&connect()?, u).await,
    }
}

/// The `-f` arguments, for messages.
fn shown(files: &[String]) -> String {
    let names: Vec<&str> = files
        .iter()
        .map(|f| if f == "-" { "<stdin>" } else { f.as_str() })
        .collect();
    names.join(", ")
}

/// The namespace a namespaced kind is read in: `-n`, else `default`; none for cluster kinds.
fn scope(kind: &Kind, ns: Option<&str>) -> Option<String> {
    kind.namespaced.then(|| ns.unwrap_or("default").to_string())
}

/// The label selector of `get`: `-l` and `--node` together.
pub fn selector(l: Option<&str>, node: Option<&str>) -> Option<String> {
    let node = node.map(|n| format!("{NODE_LABEL}={n}"));
    let parts: Vec<String> = l.map(str::to_string).into_iter().chain(node).collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// Whether an attachment is on `network`: `ns/name` exactly, or a bare name.
pub fn on_network(att: &Value, network: &str) -> bool {
    let n = text(att, "/spec/network");
    n == network || (!network.contains('/') && n.rsplit('/').next() == Some(network))
}

async fn get(client: &Client, g: &GetArgs, ns: Option<&str>) -> Result<(), Error> {
    let kind = kinds::resolve(&g.kind)?;
    if (g.node.is_some() || g.network.is_some()) && *kind != ATTACHMENT {
        return Err(Error::usage(
            "--node and --network apply to attachments only",
        ));
    }
    if g.all_namespaces && g.name.is_some() {
        return Err(Error::usage(
            "a NAME cannot be read across all namespaces (-A)",
        ));
    }
    let all = g.all_namespaces && kind.namespaced;
    let ns = if all { None } else { scope(kind, ns) };
    let layout = Layout {
        all_namespaces: all,
        wide: g.output == Some(GetFormat::Wide),
        now: table::now(),
    };
    if let Some(n) = &g.name {
        let at = format!("get {}", label(kind, n));
        let obj = client
            .get(kind, ns.as_deref(), n)
            .await
            .map_err(|e| Error::client(&at, &e))?;
        return match data_format(g.output) {
            Some(f) => print_data(&obj, f),
            None => out(&columns::table(kind, &[obj], layout).render()),
        };
    }
    let sel = selector(g.selector.as_deref(), g.node.as_deref());
    let mut list = client
        .list(kind, ns.as_deref(), sel.as_deref())
        .await
        .map_err(|e| Error::client(&format!("list {}", kind.plural), &e))?;
    if let (Some(net), Some(Value::Array(items))) = (&g.network, list.get_mut("items")) {
        items.retain(|i| on_network(i, net));
    }
    let items = list
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(f) = data_format(g.output) {
        return print_data(&list, f);
    }
    if items.is_empty() {
        match &ns {
            Some(ns) => eprintln!("No resources found in {ns} namespace."),
            None => eprintln!("No resources found."),
        }
        return Ok(());
    }
    out(&columns::table(kind, &items, layout).render())
}

fn data_format(f: Option<GetFormat>) -> Option<DataFormat> {
    match f {
        Some(GetFormat::Json) => Some(DataFormat::Json),
        Some(GetFormat::Yaml) => Some(DataFormat::Yaml),
        _ => None,
    }
}

/// Prints a value as pretty JSON or YAML.
pub fn print_data(v: &Value, f: DataFormat) -> Result<(), Error> {
    let text = match f {
        DataFormat::Json => serde_json::to_string_pretty(v)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string()),
        DataFormat::Yaml => serde_yaml_ng::to_string(v).map_err(|e| e.to_string()),
    }
    .map_err(|e| Error::new(format!("encode output: {e}")))?;
    out(&text)
}

async fn describe_one(
    client: &Client,
    kind: &'static Kind,
    n: &str,
    ns: Option<&str>,
) -> Result<(), Error> {
    let at = format!("describe {}", label(kind, n));
    let ns = scope(kind, ns);
    let obj = client
        .get(kind, ns.as_deref(), n)
        .await
        .map_err(|e| Error::client(&at, &e))?;
    let usage = if *kind == IP_POOL {
        Some(client.pool_usage(n).await.map_err(|e| e.to_string()))
    } else {
        None
    };
    out(&describe::render(kind, &obj, usage, table::now()))
}

async fn delete(
    connect: impl Fn() -> Result<Client, Error>,
    d: &DeleteArgs,
    ns: Option<&str>,
) -> Result<(), Error> {
    if !d.files.is_empty() {
        let ms = manifest::load(&d.files, &mut std::io::stdin().lock())?;
        if ms.is_empty() {
            return Err(Error::new(format!("no objects in {}", shown(&d.files))));
        }
        return apply::delete(&connect()?, &ms, ns, d.ignore_not_found).await;
    }
    let kind = kinds::resolve(d.kind.as_deref().unwrap_or_default())?;
    if d.names.is_empty() {
        return Err(Error::usage("delete needs at least one NAME"));
    }
    let client = connect()?;
    let ns = scope(kind, ns);
    let mut failed = 0;
    for n in &d.names {
        let result = apply::delete_one(&client, kind, ns.as_deref(), n, d.ignore_not_found).await;
        if let Err(e) = result {
            Error::client(&format!("delete {}", label(kind, n)), &e).print();
            failed += 1;
        }
    }
    apply::finish(failed, d.names.len())
}

async fn ipam_usage(client: &Client, u: &UsageArgs) -> Result<(), Error> {
    let pools = match &u.pool {
        Some(p) => vec![p.clone()],
        None => {
            let list = client
                .list(&IP_POOL, None, None)
                .await
                .map_err(|e| Error::client("list ippools", &e))?;
            let mut names: Vec<String> = list
                .get("items")
                .and_then(Value::as_array)
                .map(|items| items.iter().map(|i| name(i).to_string()).collect())
                .unwrap_or_default();
            names.sort();
            names
        }
    };
    if pools.is_empty() {
        eprintln!("No pools.");
        return Ok(());
    }
    let mut found = Vec::new();
    let mut failed = 0;
    for p in &pools {
        match client.pool_usage(p).await {
            Ok(v) => found.push(v),
            Err(e) => {
                Error::client(&format!("usage of {}", label(&IP_POOL, p)), &e).print();
                failed += 1;
            }
        }
    }
    match (u.output, u.pool.is_some()) {
        (Some(f), true) => {
            if let Some(one) = found.first() {
                print_data(one, f)?;
            }
        }
        (Some(f), false) => print_data(
            &json!({"apiVersion": "v1", "kind": "List", "items": found}),
            f,
        )?,
        (None, _) => {
            let text: Vec<String> = found
                .iter()
                .map(|v| usage::heading(v) + &describe::indented(&usage::render(v), 2))
                .collect();
            out(&text.join("\n"))?;
        }
    }
    apply::finish(failed, pools.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn selectors_and_network_filter() {
        assert_eq!(selector(None, None), None);
        assert_eq!(
            selector(None, Some("n1")).as_deref(),
            Some("plexus.io/node=n1")
        );
        assert_eq!(
            selector(Some("a=b"), Some("n1")).as_deref(),
            Some("a=b,plexus.io/node=n1")
        );
        let att = json!({"spec": {"network": "red/data"}});
        assert!(on_network(&att, "red/data") && on_network(&att, "data"));
        assert!(!on_network(&att, "blue/data") && !on_network(&att, "dat"));
        assert!(on_network(
            &json!({"spec": {"network": "storage"}}),
            "storage"
        ));
    }

    #[test]
    fn command_lines() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("plexusctl").chain(args.iter().copied()))
        };
        let cli = parse(&[
            "get", "att", "-A", "--node", "n1", "-o", "wide", "--server", "http://x",
        ])
        .expect("get");
        assert_eq!(cli.connection.server.as_deref(), Some("http://x"));
        let Command::Get(g) = cli.command else {
            panic!("get")
        };
        assert!(g.all_namespaces && g.output == Some(GetFormat::Wide));
        assert!(parse(&["apply", "-f", "a.yaml", "-f", "dir", "-n", "red"]).is_ok());
        assert!(parse(&["delete", "-f", "a.yaml"]).is_ok());
        assert!(parse(&["delete", "pool", "p1", "p2", "--ignore-not-found"]).is_ok());
        assert!(parse(&["ipam", "usage", "-o", "yaml"]).is_ok());
        for bad in [
            &["apply"][..],
            &["delete", "pool"],
            &["delete", "pool", "p", "-f", "x"],
            &["get"],
            &["ipam", "usage", "-o", "wide"],
            &["get", "nad", "--insecure-skip-tls-verify"],
        ] {
            let e = parse(bad).expect_err("usage error");
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }
}
