//! A delegate's result in any version: parsed, then written in every
//! version, each of which parses again.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, result)) = cni::CniResult::from_slice(data) {
        for v in cni::Version::ALL {
            let out = result.to_json(v);
            cni::CniResult::from_json(&out)
                .unwrap_or_else(|e| panic!("a result written as {v:?} does not parse: {e}: {out}"));
        }
    }
});
