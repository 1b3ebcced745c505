//! Network definitions as a node reads them from `confDir`, YAML or JSON
//! (the first byte picks), then looked up as a pod would ask.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let file = if pick % 2 == 0 {
        "defs.yaml"
    } else {
        "defs.json"
    };
    let defs = conf::Definitions::from_text(text, Path::new(file), &["kube-system".to_string()]);
    for (ns, name) in [
        (None, "macnet"),
        (Some("default"), "macnet"),
        (Some("kube-system"), "pods"),
    ] {
        let _ = defs.resolve(ns, name, "default");
    }
    let _ = defs.security_group("default", "web");
});
