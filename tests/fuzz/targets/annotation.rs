//! The pod's `k8s.v1.cni.cncf.io/networks` annotation, both forms, parsed
//! by the meta-plugin's own parser.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../../plugins/src/meta/selection.rs"]
mod selection;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(selections) = selection::parse(text) {
            for s in selections {
                assert!(!s.name.is_empty(), "a selection names a network: {s:?}");
            }
        }
    }
});
