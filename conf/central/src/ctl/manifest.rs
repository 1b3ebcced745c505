//! Objects from manifests: YAML (multi-document) or JSON files, directories of
//! them, stdin; `kind: List` unpacked into its items.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::Error;

/// One object, and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The file as the user named it (`<stdin>` for `-`).
    pub file: String,
    /// Its place among the file's objects, from 1.
    pub index: usize,
    /// The object.
    pub object: Value,
}

/// Every object the `-f` arguments name, in order; `stdin` serves `-`.
pub fn load(args: &[String], stdin: &mut dyn Read) -> Result<Vec<Manifest>, Error> {
    let mut all = Vec::new();
    for arg in args {
        if arg == "-" {
            let mut text = String::new();
            stdin
                .read_to_string(&mut text)
                .map_err(|e| Error::new(format!("read stdin: {e}")))?;
            all.extend(objects("<stdin>", &text, Format::Sniff)?);
            continue;
        }
        let path = Path::new(arg);
        let meta = std::fs::metadata(path).map_err(|e| Error::new(format!("read {arg}: {e}")))?;
        let files = if meta.is_dir() {
            directory(path)?
        } else {
            vec![path.to_path_buf()]
        };
        for f in files {
            let shown = f.display().to_string();
            let text = std::fs::read_to_string(&f)
                .map_err(|e| Error::new(format!("read {shown}: {e}")))?;
            all.extend(objects(&shown, &text, Format::of(&f))?);
        }
    }
    Ok(all)
}

/// A directory's `*.yaml`, `*.yml` and `*.json` files, sorted by name.
fn directory(dir: &Path) -> Result<Vec<std::path::PathBuf>, Error> {
    let fail = |e: std::io::Error| Error::new(format!("read directory {}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(fail)? {
        let path = entry.map_err(fail)?.path();
        if path.is_file() && Format::of(&path) != Format::Sniff {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// How a text is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
    /// JSON if it starts with `{`, else YAML.
    Sniff,
}

impl Format {
    /// By file extension.
    pub fn of(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            Some(e) if e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml") => {
                Format::Yaml
            }
            _ => Format::Sniff,
        }
    }
}

/// The objects of one file's text; errors name the file and the document.
pub fn objects(file: &str, text: &str, format: Format) -> Result<Vec<Manifest>, Error> {
    let json = match format {
        Format::Json => true,
        Format::Yaml => false,
        Format::Sniff => text.trim_start().starts_with('{'),
    };
    let docs = if json {
        json_docs(text)
    } else {
        yaml_docs(text)
    }
    .map_err(|e| Error::new(format!("{file}: {e}")))?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let at = |what: String| Error::new(format!("{file}: document {}: {what}", i + 1));
        unpack(doc, &mut out).map_err(at)?;
    }
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(i, object)| Manifest {
            file: file.to_string(),
            index: i + 1,
            object,
        })
        .collect())
}

fn json_docs(text: &str) -> Result<Vec<Value>, String> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid JSON: {e}"))
}

fn yaml_docs(text: &str) -> Result<Vec<Value>, String> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).map_err(|e| format!("invalid YAML: {e}")))
        .collect()
}

/// Pushes an object, or a List's items; skips empty documents.
fn unpack(doc: Value, out: &mut Vec<Value>) -> Result<(), String> {
    match doc {
        Value::Null => Ok(()),
        Value::Object(ref m) if is_list(m) => {
            let Some(Value::Array(items)) = m.get("items") else {
                return Err("a List needs an items array".into());
            };
            for item in items {
                unpack(item.clone(), out)?;
            }
            Ok(())
        }
        Value::Object(_) => {
            out.push(doc);
            Ok(())
        }
        other => Err(format!("expected an object, found {}", type_name(&other))),
    }
}

fn is_list(m: &serde_json::Map<String, Value>) -> bool {
    m.get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k == "List" || (k.ends_with("List") && m.contains_key("items")))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scratch directory removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn create() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("plexusctl-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(ms: &[Manifest]) -> Vec<String> {
        ms.iter()
            .map(|m| {
                format!(
                    "{}:{}",
                    m.file,
                    m.object["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect()
    }

    const MULTI: &str = "---\napiVersion: plexus.io/v1\nkind: IPPool\nmetadata: {name: a}\n\
        ---\n# only a comment\n---\napiVersion: v1\nkind: List\nitems:\n\
        - {apiVersion: plexus.io/v1, kind: IPPool, metadata: {name: b}}\n\
        - {apiVersion: plexus.io/v1, kind: IPPool, metadata: {name: c}}\n---\n";

    #[test]
    fn yaml_multi_document_and_lists() {
        let ms = objects("x.yaml", MULTI, Format::Yaml).expect("parse");
        assert_eq!(names(&ms), ["x.yaml:a", "x.yaml:b", "x.yaml:c"]);
        // Sniffed as YAML, then as a JSON stream.
        let ms = objects("-", MULTI, Format::Sniff).expect("sniff yaml");
        assert_eq!(ms.len(), 3);
        let json = r#"{"kind":"List","apiVersion":"v1","items":[{"metadata":{"name":"j1"}}]}
            {"metadata":{"name":"j2"}}"#;
        let ms = objects("-", json, Format::Sniff).expect("sniff json");
        assert_eq!(names(&ms), ["-:j1", "-:j2"]);
    }

    #[test]
    fn errors_name_file_and_document() {
        let e = objects("bad.yaml", "a: 1\n---\n- x\n", Format::Yaml).expect_err("array");
        assert_eq!(
            e.message,
            "bad.yaml: document 2: expected an object, found an array"
        );
        let e = objects("bad.json", "{\"a\": ", Format::Json).expect_err("eof");
        assert!(
            e.message.starts_with("bad.json: invalid JSON"),
            "{}",
            e.message
        );
        let e = objects("l.yaml", "kind: List\nitems: 3\n", Format::Yaml).expect_err("items");
        assert!(e.message.contains("items array"), "{}", e.message);
        let e = objects("t.yaml", "a: [\n", Format::Yaml).expect_err("syntax");
        assert!(
            e.message.starts_with("t.yaml: invalid YAML"),
            "{}",
            e.message
        );
    }

    #[test]
    fn files_directories_and_stdin() {
        let dir = TempDir::create();
        let d = dir.path();
        std::fs::write(d.join("b.yml"), "metadata: {name: b}\n").expect("write");
        std::fs::write(d.join("a.json"), r#"{"metadata": {"name": "a"}}"#).expect("write");
        std::fs::write(d.join("c.yaml"), "metadata: {name: c}\n").expect("write");
        std::fs::write(d.join("README.md"), "# not a manifest").expect("write");
        std::fs::create_dir(d.join("sub.yaml")).expect("mkdir");
        let single = d.join("c.yaml").display().to_string();
        let args = [d.display().to_string(), "-".to_string(), single.clone()];
        let mut stdin = "metadata: {name: s}\n".as_bytes();
        let ms = load(&args, &mut stdin).expect("load");
        let got: Vec<_> = ms.iter().map(|m| kinds_name(&m.object)).collect();
        assert_eq!(got, ["a", "b", "c", "s", "c"]);
        assert_eq!(ms[3].file, "<stdin>");
        assert_eq!(ms[4].file, single);

        let missing = d.join("nope.yaml").display().to_string();
        let e = load(std::slice::from_ref(&missing), &mut "".as_bytes()).expect_err("missing");
        assert!(
            e.message.starts_with(&format!("read {missing}:")),
            "{}",
            e.message
        );
    }

    fn kinds_name(v: &Value) -> &str {
        crate::ctl::kinds::name(v)
    }
}
