//! The plugin entry: `CNI_*` environment and stdin in, a result or an error
//! object out, checked the way the reference library checks them.

use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::json;

use crate::config::{validate_container_id, validate_ifname, NetConf};
use crate::error::{code, Error};
use crate::result::CniResult;
use crate::version::Version;

/// The operations of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }

    /// The command as `CNI_COMMAND` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    /// The environment variables the spec requires for this command.
    fn required_env(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => {
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
            }
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Command::Gc | Command::Status => &["CNI_PATH"],
            Command::Version => &[],
        }
    }
}

/// One invocation, validated: what a plugin's command handlers receive.
#[derive(Debug, Clone)]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as given.
    pub args: String,
    /// `CNI_PATH` as given.
    pub path: String,
    /// The config bytes as read from stdin.
    pub stdin: Vec<u8>,
    /// The parsed config (unknown fields in `extra`).
    pub conf: NetConf,
    /// The config's version: results are written in it.
    pub version: Version,
}

/// A CNI plugin: one handler per command.
pub trait Plugin {
    /// ADD: attach, and return what was attached.
    fn add(&self, req: &Request) -> Result<CniResult, Error>;
    /// DEL: release; what is already gone is success.
    fn del(&self, req: &Request) -> Result<(), Error>;
    /// CHECK: verify that what ADD made is still there.
    fn check(&self, req: &Request) -> Result<(), Error>;
    /// GC: release everything not in `cni.dev/valid-attachments`.
    fn gc(&self, _req: &Request) -> Result<(), Error> {
        Ok(())
    }
    /// STATUS: ready to serve ADD?
    fn status(&self, _req: &Request) -> Result<(), Error> {
        Ok(())
    }
}

/// What a run printed and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub exit_code: u8,
}

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Runs one invocation given its environment and stdin; pure apart from the
/// plugin's own effects, so it can be tested without a process.
pub fn dispatch<P: Plugin + ?Sized>(
    plugin: &P,
    env: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Outcome {
    // An error found before the config is parsed (a missing or bad CNI_*
    // variable) still answers in the config's version, when it names one.
    let mut version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str()?.parse::<Version>().ok())
        .unwrap_or(Version::LATEST);
    match dispatch_inner(plugin, &env, stdin, &mut version) {
        Ok(Some(v)) => Outcome {
            stdout: json_bytes(&v),
            exit_code: 0,
        },
        Ok(None) => Outcome {
            stdout: Vec::new(),
            exit_code: 0,
        },
        Err(e) => Outcome {
            stdout: json_bytes(&e.to_json(version)),
            exit_code: 1,
        },
    }
}

fn dispatch_inner<P: Plugin + ?Sized>(
    plugin: &P,
    env: &impl Fn(&str) -> Option<String>,
    stdin: &[u8],
    version: &mut Version,
) -> Result<Option<serde_json::Value>, Error> {
    let get = |k: &str| env(k).unwrap_or_default();
    let raw_cmd = get("CNI_COMMAND");
    if raw_cmd.is_empty() {
        return Err(Error::new(
            code::INVALID_ENVIRONMENT,
            "required env variables [CNI_COMMAND] missing",
        ));
    }
    let command = Command::parse(&raw_cmd).ok_or_else(|| {
        Error::new(code::INVALID_ENVIRONMENT, "unknown CNI_COMMAND").with_details(raw_cmd.clone())
    })?;
    if command == Command::Version {
        // Answer in the caller's version when it names a supported one.
        let asked = serde_json::from_slice::<serde_json::Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str()?.parse::<Version>().ok())
            .unwrap_or(Version::LATEST);
        *version = asked;
        return Ok(Some(json!({
            "cniVersion": asked.as_str(),
            "supportedVersions": Version::supported(),
        })));
    }
    let missing: Vec<&str> = command
        .required_env()
        .iter()
        .copied()
        .filter(|k| get(k).is_empty())
        .collect();
    if !missing.is_empty() {
        return Err(Error::new(
            code::INVALID_ENVIRONMENT,
            format!("required env variables [{}] missing", missing.join(", ")),
        ));
    }
    let (conf, v) = NetConf::parse(stdin)?;
    *version = v;
    let req = Request {
        command,
        container_id: get("CNI_CONTAINERID"),
        netns: get("CNI_NETNS"),
        ifname: get("CNI_IFNAME"),
        args: get("CNI_ARGS"),
        path: get("CNI_PATH"),
        stdin: stdin.to_vec(),
        conf,
        version: v,
    };
    if matches!(command, Command::Add | Command::Del | Command::Check) {
        validate_container_id(&req.container_id)?;
        validate_ifname(&req.ifname)?;
    }
    match command {
        Command::Add => return plugin.add(&req).map(|r| Some(r.to_json(v))),
        Command::Del => plugin.del(&req)?,
        Command::Check if !v.has_check() => {
            return Err(Error::new(
                code::INCOMPATIBLE_VERSION,
                "config version does not allow CHECK",
            )
            .with_details(format!("config is {v}, CHECK needs 0.4.0 or later")))
        }
        Command::Check => plugin.check(&req)?,
        Command::Gc | Command::Status if !v.has_gc_and_status() => {
            return Err(Error::new(
                code::INCOMPATIBLE_VERSION,
                format!("config version does not allow {}", command.as_str()),
            )
            .with_details(format!("config is {v}, {} needs 1.1.0", command.as_str())))
        }
        Command::Gc => plugin.gc(&req)?,
        Command::Status => plugin.status(&req)?,
        Command::Version => unreachable!("answered above"),
    }
    Ok(None)
}

/// The `main` of a plugin binary: reads the process environment and stdin,
/// prints the outcome on stdout. Without `CNI_COMMAND`, `about` also goes to
/// stderr for the human who ran it by hand.
pub fn run<P: Plugin + ?Sized>(plugin: &P, about: &str) -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command.is_empty() {
        eprintln!(
            "{about}\nCNI protocol versions supported: {}",
            Version::supported().join(", ")
        );
    }
    let mut stdin = Vec::new();
    // VERSION and a bare invocation need no stdin; don't block on a terminal.
    if !command.is_empty() && command != "VERSION" {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            let err = Error::new(code::IO_FAILURE, "cannot read stdin").with_details(e.to_string());
            let _ = std::io::stdout().write_all(&json_bytes(&err.to_json(Version::LATEST)));
            return ExitCode::from(1);
        }
    } else if command == "VERSION" || !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // Without CNI_COMMAND, a config piped in still gives the error its
        // version; a terminal is never waited on.
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let out = dispatch(plugin, |k| std::env::var(k).ok(), &stdin);
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&out.stdout);
    let _ = stdout.flush();
    ExitCode::from(out.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Echo;
    impl Plugin for Echo {
        fn add(&self, req: &Request) -> Result<CniResult, Error> {
            Ok(CniResult {
                interfaces: vec![crate::result::Interface {
                    name: req.ifname.clone(),
                    sandbox: Some(req.netns.clone()),
                    ..Default::default()
                }],
                ..Default::default()
            })
        }
        fn del(&self, _: &Request) -> Result<(), Error> {
            Ok(())
        }
        fn check(&self, _: &Request) -> Result<(), Error> {
            Ok(())
        }
    }

    fn call(env: &[(&str, &str)], stdin: &str) -> (serde_json::Value, u8) {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = dispatch(&Echo, |k| env.get(k).cloned(), stdin.as_bytes());
        let v = if out.stdout.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&out.stdout).unwrap()
        };
        (v, out.exit_code)
    }

    const FULL: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn add_answers_in_config_version() {
        let (v, rc) = call(&FULL, r#"{"cniVersion":"0.3.1","name":"n","type":"echo"}"#);
        assert_eq!(rc, 0);
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["interfaces"][0]["name"], "eth0");
    }

    #[test]
    fn env_errors() {
        let (v, rc) = call(&[], "{}");
        assert_eq!((v["code"].as_u64(), rc), (Some(4), 1));
        let (v, _) = call(&[("CNI_COMMAND", "FROB")], "{}");
        assert_eq!(v["code"], 4);
        let (v, _) = call(
            &FULL[..3],
            r#"{"cniVersion":"1.0.0","name":"n","type":"e"}"#,
        );
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("CNI_IFNAME"));
        let mut bad_if = FULL;
        bad_if[3] = ("CNI_IFNAME", "eth0/x");
        let (v, _) = call(&bad_if, r#"{"cniVersion":"1.0.0","name":"n","type":"e"}"#);
        assert_eq!(v["code"], 4);
        // Found before the config is parsed, still in the config's version.
        let (v, _) = call(
            &FULL[..3],
            r#"{"cniVersion":"0.4.0","name":"n","type":"e"}"#,
        );
        assert_eq!(
            (v["code"].as_u64(), v["cniVersion"].as_str()),
            (Some(4), Some("0.4.0"))
        );
        let (v, _) = call(&[], r#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(v["cniVersion"], "1.0.0");
    }

    #[test]
    fn version_and_gates() {
        let (v, rc) = call(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(rc, 0);
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        let mut check = FULL;
        check[0] = ("CNI_COMMAND", "CHECK");
        let (v, _) = call(&check, r#"{"cniVersion":"0.3.1","name":"n","type":"e"}"#);
        assert_eq!(v["code"], 1);
        let (v, rc) = call(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")],
            r#"{"cniVersion":"1.0.0","name":"n","type":"e"}"#,
        );
        assert_eq!((v["code"].as_u64(), rc), (Some(1), 1));
        let (v, rc) = call(
            &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/x")],
            r#"{"cniVersion":"1.1.0","name":"n","type":"e"}"#,
        );
        assert_eq!((v, rc), (serde_json::Value::Null, 0));
    }
}
