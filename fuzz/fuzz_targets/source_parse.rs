//! Arbitrary bytes through the checkpoint parsers: `config.json` and a safetensors header.
//!
//! The input is split at the first `0xFF` byte (never valid in UTF-8 JSON): the part before it
//! is parsed as a config.json, the part after it as a whole safetensors file. Neither parser may
//! panic; every tensor a safetensors file is accepted with must lie inside the bytes given, with
//! exactly the size its dtype and shape need; and an accepted config must pass its own limits.

#![no_main]

use bitnet_pack::model::ModelConfig;
use bitnet_pack::source::parse_safetensors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (config, weights) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(cfg) = ModelConfig::from_json(config) {
        assert!(cfg.check_limits().is_ok(), "an accepted config fails its limits");
    }
    if let Ok(infos) = parse_safetensors(weights) {
        for (name, info, data_start) in infos {
            let (begin, end) = info.data_offsets;
            assert!(begin <= end, "{name}: reversed offsets accepted");
            assert!(
                data_start + end <= weights.len(),
                "{name}: accepted beyond the end of the file"
            );
            let numel: usize = info.shape.iter().product();
            assert_eq!(
                numel * info.dtype.bitsize() / 8,
                end - begin,
                "{name}: size does not match dtype and shape"
            );
        }
    }
});
