//! Running other plugins: find by type in `CNI_PATH`, exec with the `CNI_*`
//! environment and a config on stdin, read back a result or an error. The list
//! operations follow libcni (injection, `prevResult` chaining, DEL in reverse).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};
use tracing::debug;

use crate::config::{Attachment, NetConfList};
use crate::error::{self, code, Error};
use crate::plugin::{Command, Plugin};
use crate::version::Version;

/// The per-attachment part of a plugin's environment.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub container_id: String,
    /// Netns path; may be empty (DEL after the sandbox is gone).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`, passed as given.
    pub args: String,
}

/// Adjusts each plugin process before it starts (e.g. enter a netns).
pub type Hook = Arc<dyn Fn(&mut Process) + Send + Sync>;

/// A plugin compiled into the caller, run in-process instead of exec'd.
pub type Builtin = Arc<dyn Plugin + Send + Sync>;

/// Runs plugins found in a `CNI_PATH`, or built in.
#[derive(Clone)]
pub struct Executor {
    path: String,
    hook: Option<Hook>,
    builtins: Vec<(String, Builtin)>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("path", &self.path)
            .finish()
    }
}

impl Executor {
    /// An executor searching `path` (colon-separated directories).
    pub fn new(path: impl Into<String>) -> Self {
        Executor {
            path: path.into(),
            hook: None,
            builtins: Vec::new(),
        }
    }

    /// Runs plugin type `name` in-process with `plugin`, through the same
    /// entry (checks, errors, output) a plugin binary uses.
    pub fn with_builtin(mut self, name: &str, plugin: Builtin) -> Self {
        self.builtins.push((name.to_string(), plugin));
        self
    }

    /// Whether `plugin_type` can be run: built in, or found in `CNI_PATH`.
    pub fn available(&self, plugin_type: &str) -> Result<(), Error> {
        if self.builtin(plugin_type).is_some() {
            return Ok(());
        }
        self.find(plugin_type).map(|_| ())
    }

    fn builtin(&self, plugin_type: &str) -> Option<&Builtin> {
        self.builtins
            .iter()
            .find(|(n, _)| n == plugin_type)
            .map(|(_, p)| p)
    }

    /// Runs `hook` on every plugin process before it is spawned.
    pub fn with_hook(mut self, hook: Hook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The `CNI_PATH` this executor searches.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The first executable named `plugin_type` in `CNI_PATH`.
    pub fn find(&self, plugin_type: &str) -> Result<PathBuf, Error> {
        if plugin_type.is_empty() || plugin_type.contains('/') {
            return Err(Error::new(
                code::INVALID_NETWORK_CONFIG,
                format!("invalid plugin type {plugin_type:?}"),
            ));
        }
        self.path
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::new(
                    code::INVALID_NETWORK_CONFIG,
                    format!("failed to find plugin {plugin_type:?} in path"),
                )
                .with_details(format!("CNI_PATH={}", self.path))
            })
    }

    /// Execs one plugin; returns its stdout on success, its error otherwise.
    pub fn exec(
        &self,
        plugin_type: &str,
        command: Command,
        inv: &Invocation,
        stdin: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let started = Instant::now();
        let (out, how) = match self.builtin(plugin_type) {
            Some(plugin) => (
                self.run_builtin(plugin.as_ref(), command, inv, stdin),
                "in process",
            ),
            None => (
                self.find(plugin_type)
                    .and_then(|program| self.exec_program(&program, command, inv, stdin)),
                "exec'd",
            ),
        };
        ran(plugin_type, how, command, &inv.ifname, started, &out);
        out
    }

    fn run_builtin(
        &self,
        plugin: &(dyn Plugin + Send + Sync),
        command: Command,
        inv: &Invocation,
        stdin: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let per_attachment = !matches!(command, Command::Version | Command::Gc | Command::Status);
        let env = |k: &str| -> Option<String> {
            match k {
                "CNI_COMMAND" => Some(command.as_str().to_string()),
                "CNI_PATH" => Some(self.path.clone()),
                "CNI_CONTAINERID" if per_attachment => Some(inv.container_id.clone()),
                "CNI_NETNS" if per_attachment => Some(inv.netns.clone()),
                "CNI_IFNAME" if per_attachment => Some(inv.ifname.clone()),
                "CNI_ARGS" if per_attachment => Some(inv.args.clone()),
                _ => None,
            }
        };
        let out = crate::plugin::dispatch(plugin, env, stdin);
        if out.exit_code == 0 {
            return Ok(out.stdout);
        }
        Err(
            serde_json::from_slice::<Error>(&out.stdout).unwrap_or_else(|e| {
                Error::new(code::INTERNAL, "built-in plugin failed").with_details(e.to_string())
            }),
        )
    }

    /// Execs the plugin binary at `program`.
    pub fn exec_program(
        &self,
        program: &Path,
        command: Command,
        inv: &Invocation,
        stdin: &[u8],
    ) -> Result<Vec<u8>, Error> {
        self.start_program(program, command, inv, stdin)?.wait()
    }

    /// Whether `plugin_type` runs in-process.
    pub fn is_builtin(&self, plugin_type: &str) -> bool {
        self.builtin(plugin_type).is_some()
    }

    /// Starts the plugin binary of `plugin_type` (not a built-in) and hands
    /// it `stdin`; the caller does other work, then waits for its answer.
    pub fn start(
        &self,
        plugin_type: &str,
        command: Command,
        inv: &Invocation,
        stdin: &[u8],
    ) -> Result<Running, Error> {
        let program = self.find(plugin_type)?;
        let mut running = self.start_program(&program, command, inv, stdin)?;
        running.beside = Some((
            plugin_type.to_string(),
            command,
            inv.ifname.clone(),
            Instant::now(),
        ));
        Ok(running)
    }

    fn start_program(
        &self,
        program: &Path,
        command: Command,
        inv: &Invocation,
        stdin: &[u8],
    ) -> Result<Running, Error> {
        let mut p = Process::new(program);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CNI_") {
                p.env_remove(k);
            }
        }
        p.env("CNI_COMMAND", command.as_str())
            .env("CNI_PATH", &self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !matches!(command, Command::Version | Command::Gc | Command::Status) {
            p.env("CNI_CONTAINERID", &inv.container_id)
                .env("CNI_NETNS", &inv.netns)
                .env("CNI_IFNAME", &inv.ifname)
                .env("CNI_ARGS", &inv.args);
        }
        if let Some(hook) = &self.hook {
            hook(&mut p);
        }
        let what = format!("{} {}", program.display(), command.as_str());
        let mut child = p.spawn().map_err(|e| {
            Error::new(code::IO_FAILURE, format!("exec {what}")).with_details(e.to_string())
        })?;
        if let Some(mut input) = child.stdin.take() {
            // A plugin may exit without reading stdin; a broken pipe is not our failure.
            let _ = input.write_all(stdin);
        }
        Ok(Running {
            child,
            what,
            beside: None,
        })
    }

    /// ADD of every plugin in order, each seeing the previous one's result.
    /// Returns the last result as the plugin wrote it.
    pub fn add_list(
        &self,
        list: &NetConfList,
        inv: &Invocation,
        caps: &Map<String, Value>,
    ) -> Result<Value, Error> {
        let mut prev: Option<Value> = None;
        for i in 0..list.plugins.len() {
            let conf = list.plugin_config(i, caps, prev.as_ref());
            let out = self.exec(list.plugin_type(i), Command::Add, inv, &to_bytes(&conf))?;
            if out.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(&out).map_err(|e| {
                Error::new(
                    code::DECODING_FAILURE,
                    format!(
                        "plugin {} returned a result that is not JSON",
                        list.plugin_type(i)
                    ),
                )
                .with_details(e.to_string())
            })?;
            prev = Some(v);
        }
        Ok(prev.unwrap_or_else(|| serde_json::json!({"cniVersion": list.cni_version})))
    }

    /// DEL of every plugin in reverse order; keeps going past failures and
    /// reports them together.
    pub fn del_list(
        &self,
        list: &NetConfList,
        inv: &Invocation,
        caps: &Map<String, Value>,
        prev: Option<&Value>,
    ) -> Result<(), Error> {
        let mut errors = Vec::new();
        for i in (0..list.plugins.len()).rev() {
            let conf = list.plugin_config(i, caps, prev);
            if let Err(e) = self.exec(list.plugin_type(i), Command::Del, inv, &to_bytes(&conf)) {
                errors.push(e.context(format!("DEL {}", list.plugin_type(i))));
            }
        }
        error::combine(errors)
    }

    /// CHECK of every plugin with the list's cached result (from 0.4.0 on;
    /// older lists and `disableCheck` pass).
    pub fn check_list(
        &self,
        list: &NetConfList,
        inv: &Invocation,
        caps: &Map<String, Value>,
        prev: &Value,
    ) -> Result<(), Error> {
        if !list.version().has_check() || list.disable_check {
            return Ok(());
        }
        for i in 0..list.plugins.len() {
            let conf = list.plugin_config(i, caps, Some(prev));
            self.exec(list.plugin_type(i), Command::Check, inv, &to_bytes(&conf))
                .map_err(|e| e.context(format!("CHECK {}", list.plugin_type(i))))?;
        }
        Ok(())
    }

    /// GC of every plugin (1.1.0 lists only), each told the valid attachments.
    pub fn gc_list(&self, list: &NetConfList, valid: &[Attachment]) -> Result<(), Error> {
        if !list.version().has_gc_and_status() || list.disable_gc {
            return Ok(());
        }
        let valid = serde_json::to_value(valid).unwrap_or_default();
        let mut errors = Vec::new();
        for i in 0..list.plugins.len() {
            let mut conf = list.plugin_config(i, &Map::new(), None);
            conf.insert("cni.dev/valid-attachments".into(), valid.clone());
            let inv = Invocation::default();
            if let Err(e) = self.exec(list.plugin_type(i), Command::Gc, &inv, &to_bytes(&conf)) {
                errors.push(e.context(format!("GC {}", list.plugin_type(i))));
            }
        }
        error::combine(errors)
    }

    /// STATUS of every plugin (1.1.0 lists only).
    pub fn status_list(&self, list: &NetConfList) -> Result<(), Error> {
        if !list.version().has_gc_and_status() {
            return Ok(());
        }
        for i in 0..list.plugins.len() {
            let conf = list.plugin_config(i, &Map::new(), None);
            let inv = Invocation::default();
            self.exec(list.plugin_type(i), Command::Status, &inv, &to_bytes(&conf))
                .map_err(|e| e.context(format!("STATUS {}", list.plugin_type(i))))?;
        }
        Ok(())
    }

    /// VERSION of a plugin: the versions it supports.
    pub fn versions(&self, plugin_type: &str) -> Result<Vec<Version>, Error> {
        let stdin = serde_json::json!({"cniVersion": Version::LATEST.as_str()});
        let out = self.exec(
            plugin_type,
            Command::Version,
            &Invocation::default(),
            &to_bytes(&stdin),
        )?;
        let v: Value = serde_json::from_slice(&out).map_err(|e| {
            Error::new(code::DECODING_FAILURE, "VERSION answer is not JSON")
                .with_details(e.to_string())
        })?;
        Ok(v.get("supportedVersions")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str()?.parse().ok()).collect())
            .unwrap_or_default())
    }
}

/// The debug line of one plugin run: which, on what, how long, how it ended.
fn ran(
    plugin_type: &str,
    how: &str,
    command: Command,
    ifname: &str,
    started: Instant,
    out: &Result<Vec<u8>, Error>,
) {
    let ms = (started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
    match out {
        Ok(_) => debug!(plugin = plugin_type, command = command.as_str(), ifname = %ifname,
            duration_ms = ms, run = how, "plugin ok"),
        Err(e) => debug!(plugin = plugin_type, command = command.as_str(), ifname = %ifname,
            duration_ms = ms, run = how, code = e.code, error = %e.msg, "plugin failed"),
    }
}

fn to_bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// A plugin process started by [`Executor::start`], its stdin written and closed.
pub struct Running {
    child: std::process::Child,
    what: String,
    /// For the debug line of a plugin started beside other work.
    beside: Option<(String, Command, String, Instant)>,
}

impl Running {
    /// Waits for the plugin: its stdout on success, its error otherwise.
    pub fn wait(mut self) -> Result<Vec<u8>, Error> {
        let beside = self.beside.take();
        let out = self.finish();
        if let Some((plugin, command, ifname, started)) = beside {
            ran(
                &plugin,
                "exec'd beside other work",
                command,
                &ifname,
                started,
                &out,
            );
        }
        out
    }

    fn finish(self) -> Result<Vec<u8>, Error> {
        let what = self.what;
        let out = self.child.wait_with_output().map_err(|e| {
            Error::new(code::IO_FAILURE, format!("wait for {what}")).with_details(e.to_string())
        })?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        if let Ok(err) = serde_json::from_slice::<Error>(&out.stdout) {
            return Err(err);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        Err(
            Error::new(code::INTERNAL, format!("{what} failed: {}", out.status))
                .with_details(format!("{}{}", stdout.trim(), stderr.trim())),
        )
    }
}
