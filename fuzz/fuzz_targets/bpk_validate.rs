//! Arbitrary bytes through the .bpk reader and validator.
//!
//! Checks that neither `validate_bytes` nor `BpkFile::from_storage` panics on any input, that
//! a file the reader accepts can have each tensor dequantized without panicking, and that the
//! two entry points agree: a file with a clean validation report must open, and every one of
//! its tensors must dequantize to exactly `numel` values.

#![no_main]

use std::path::Path;

use bitnet_pack::format::{BpkFile, Storage, validate_bytes};
use libfuzzer_sys::fuzz_target;

/// Largest tensor (in elements) we dequantize: the header may claim any shape, and a
/// dequantized tensor is allocated in full, so a few header bytes could otherwise ask for
/// gigabytes. 2^24 f32 values is 64 MiB.
const MAX_NUMEL: u64 = 1 << 24;

fuzz_target!(|data: &[u8]| {
    let report = validate_bytes(data);
    assert_eq!(report.summary.file_len, data.len() as u64);

    let opened = BpkFile::from_storage(Path::new("fuzz.bpk"), Storage::Owned(data.to_vec()));
    let file = match opened {
        Ok(file) => file,
        Err(err) => {
            // Validation runs every check opening does, and more.
            assert!(
                !report.ok(),
                "validate_bytes reported no problem but opening failed: {err}"
            );
            return;
        }
    };
    for entry in &file.header.tensors {
        let Some(numel) = entry.numel().filter(|&n| n <= MAX_NUMEL) else {
            continue;
        };
        match file.dequantize_f32(entry) {
            Ok(values) => assert_eq!(
                values.len() as u64,
                numel,
                "tensor `{}` dequantized to the wrong number of values",
                entry.name
            ),
            Err(err) => assert!(
                !report.ok(),
                "validate_bytes reported no problem but tensor `{}` fails to dequantize: {err}",
                entry.name
            ),
        }
    }
});
