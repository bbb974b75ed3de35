//! YAML + `STACKWISE_*` variables + `--set` overrides → a validated config → a stage plan.
//! Input: the YAML, then lines `KEY=VALUE` (environment), then `--set` lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackwise_common::config::config_from_str;
use stackwise_common::plan::plan_config;

#[path = "split.rs"]
mod split;

fuzz_target!(|data: &[u8]| {
    let p = split::parts(data, 3);
    let (Ok(yaml), Ok(env), Ok(sets)) = (
        std::str::from_utf8(p[0]),
        std::str::from_utf8(p[1]),
        std::str::from_utf8(p[2]),
    ) else {
        return;
    };
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("STACKWISE_{k}"), v.to_string()))
        .collect();
    let sets: Vec<String> = sets.lines().map(str::to_string).collect();
    if let Ok(cfg) = config_from_str(yaml, env, &sets) {
        let _ = cfg.training.validate();
        if let Ok(model) = cfg.model.resolve(Some(257)) {
            let _ = model.validate();
        }
        let _ = plan_config(&cfg);
    }
});
