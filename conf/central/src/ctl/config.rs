//! Where the server is and how to authenticate: flags beat the environment,
//! which beats the config file (YAML or JSON: `server`, `token`,
//! `certificateAuthority`).

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use super::Error;
use crate::client::Client;

/// The connection flags.
#[derive(Debug, Default, Clone, Args)]
#[command(next_help_heading = "Connection")]
pub struct Flags {
    /// API server URL, http:// (loopback) or https:// [env: PLEXUS_SERVER]
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token [env: PLEXUS_TOKEN]
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate [env: PLEXUS_CA]
    #[arg(long, global = true, value_name = "FILE")]
    pub certificate_authority: Option<PathBuf>,
    /// Config file [env: PLEXUSCONFIG] [default: ~/.config/plexus/config]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The config file's contents.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub server: Option<String>,
    pub token: Option<String>,
    pub certificate_authority: Option<PathBuf>,
}

/// The settings in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub server: String,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
}

impl Connection {
    /// A client for these settings.
    pub fn client(&self) -> Result<Client, Error> {
        let https = self.server.to_ascii_lowercase().starts_with("https://");
        if https && self.ca.is_none() {
            return Err(Error::new(format!(
                "{}: https needs the CA's certificate: give --certificate-authority, \
                 PLEXUS_CA, or `certificateAuthority` in the config file",
                self.server
            )));
        }
        Client::new(&self.server, self.token.as_deref(), self.ca.as_deref())
            .map_err(|e| Error::new(e.to_string()))
    }
}

/// Resolves the settings; `env` reads an environment variable.
pub fn resolve(flags: &Flags, env: &dyn Fn(&str) -> Option<String>) -> Result<Connection, Error> {
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    let (path, explicit) = match (&flags.config, env("PLEXUSCONFIG")) {
        (Some(p), _) => (Some(p.clone()), true),
        (None, Some(p)) => (Some(PathBuf::from(p)), true),
        (None, None) => (
            env("HOME").map(|h| Path::new(&h).join(".config/plexus/config")),
            false,
        ),
    };
    let file = match &path {
        Some(p) => read_file(p, explicit)?,
        None => FileConfig::default(),
    };
    // A relative CA path in the file is relative to the file.
    let file_ca = file.certificate_authority.map(|ca| match &path {
        Some(p) if ca.is_relative() => p.parent().unwrap_or(Path::new("")).join(ca),
        _ => ca,
    });
    let server = flags
        .server
        .clone()
        .or_else(|| env("PLEXUS_SERVER"))
        .or(file.server)
        .ok_or_else(|| {
            Error::new(match &path {
                Some(p) => format!(
                    "no server: give --server, PLEXUS_SERVER, or `server` in {}",
                    p.display()
                ),
                None => "no server: give --server or PLEXUS_SERVER".to_string(),
            })
        })?;
    Ok(Connection {
        server,
        token: flags
            .token
            .clone()
            .or_else(|| env("PLEXUS_TOKEN"))
            .or(file.token),
        ca: flags
            .certificate_authority
            .clone()
            .or_else(|| env("PLEXUS_CA").map(PathBuf::from))
            .or(file_ca),
    })
}

/// Reads a config file; a missing default file is an empty one.
fn read_file(path: &Path, explicit: bool) -> Result<FileConfig, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(FileConfig::default())
        }
        Err(e) => return Err(Error::new(format!("read config {}: {e}", path.display()))),
    };
    parse_file(&text).map_err(|e| Error::new(format!("config {}: {e}", path.display())))
}

/// Parses a config file's text, JSON or YAML.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::manifest::tests::TempDir;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let dir = TempDir::create();
        let home = dir.path().join("home");
        std::fs::create_dir_all(home.join(".config/plexus")).expect("mkdir");
        std::fs::write(
            home.join(".config/plexus/config"),
            "server: https://file:6443\ntoken: file-token\ncertificateAuthority: ca.pem\n",
        )
        .expect("write");
        let h = home.to_str().expect("utf-8");

        let c = resolve(&Flags::default(), &env_of(&[("HOME", h)])).expect("file");
        assert_eq!(c.server, "https://file:6443");
        assert_eq!(c.token.as_deref(), Some("file-token"));
        assert_eq!(c.ca, Some(home.join(".config/plexus/ca.pem")));

        let env = env_of(&[
            ("HOME", h),
            ("PLEXUS_SERVER", "https://env"),
            ("PLEXUS_TOKEN", ""),
            ("PLEXUS_CA", "/env/ca"),
        ]);
        let c = resolve(&Flags::default(), &env).expect("env");
        assert_eq!(c.server, "https://env");
        assert_eq!(c.token.as_deref(), Some("file-token"), "empty env is unset");
        assert_eq!(c.ca, Some(PathBuf::from("/env/ca")));

        let flags = Flags {
            server: Some("http://127.0.0.1:8080".into()),
            token: Some("flag-token".into()),
            ..Flags::default()
        };
        let c = resolve(&flags, &env).expect("flags");
        assert_eq!(c.server, "http://127.0.0.1:8080");
        assert_eq!(c.token.as_deref(), Some("flag-token"));
        assert_eq!(c.ca, Some(PathBuf::from("/env/ca")));
    }

    #[test]
    fn config_file_choice() {
        let dir = TempDir::create();
        let json = dir.path().join("c.json");
        std::fs::write(&json, r#"{"server": "http://localhost:1", "token": "j"}"#).expect("write");
        let env = env_of(&[("PLEXUSCONFIG", json.to_str().expect("utf-8"))]);
        let c = resolve(&Flags::default(), &env).expect("PLEXUSCONFIG");
        assert_eq!(
            (c.server.as_str(), c.token.as_deref()),
            ("http://localhost:1", Some("j"))
        );

        // An explicit file must exist; the default one need not.
        let flags = Flags {
            config: Some(dir.path().join("absent")),
            server: Some("http://x".into()),
            ..Flags::default()
        };
        let e = resolve(&flags, &env).expect_err("missing explicit");
        assert!(e.message.contains("absent"), "{e:?}");
        let home = dir.path().to_str().expect("utf-8");
        let e = resolve(&Flags::default(), &env_of(&[("HOME", home)])).expect_err("no server");
        assert!(e.message.starts_with("no server"), "{e:?}");

        assert!(parse_file("server: x\ntypo: y\n")
            .expect_err("unknown key")
            .contains("typo"));
        assert_eq!(parse_file("\n").expect("empty"), FileConfig::default());
    }
}
