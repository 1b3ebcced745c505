//! A plugin config as the runtime hands it over, and a conflist: parsed,
//! and what parses serializes again and parses the same.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((conf, _)) = cni::NetConf::parse(data) {
        let again = serde_json::to_vec(&conf).expect("a parsed config serializes");
        let (reparsed, _) = cni::NetConf::parse(&again).expect("a serialized config parses");
        assert_eq!(reparsed.name, conf.name);
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(list) = cni::NetConfList::parse_value(&v) {
            for i in 0..list.plugins.len() {
                let _ = list.plugin_type(i);
            }
        }
    }
});
