//! `CNI_ARGS` as a runtime sets it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(args) = cni::args::CniArgs::parse(text) {
            let _ = args.get("K8S_POD_NAME");
        }
    }
});
