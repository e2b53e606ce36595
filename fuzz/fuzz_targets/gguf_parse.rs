//! Arbitrary bytes through the GGUF reader.
//!
//! Checks that `parse` never panics, and that for a file it accepts every tensor's bytes can be
//! read (with the planned length) and every ternary tensor decoded without panicking, to the
//! right number of trits; that every accessor works; and that writing what was read with our
//! writer gives a file that parses to the same keys and tensors.

#![no_main]

use std::path::Path;

use bitnet_pack::gguf::{GgufPlan, GgufWriter, TensorSpec, parse};
use libfuzzer_sys::fuzz_target;

/// Largest tensor (in elements) we decode: a few header bytes may claim any shape backed by
/// few data bytes only if the type is tiny, but decoding allocates one i8 per element.
const MAX_NUMEL: u64 = 1 << 24;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = parse(data) else {
        return;
    };
    for (key, _) in file.kv() {
        assert!(file.get(key).is_some());
        let _ = (file.get_u32(key), file.get_str(key), file.get_uint(key));
    }
    for t in file.tensors() {
        assert_eq!(
            file.tensor_data(t).len() as u64,
            t.size,
            "tensor {}",
            t.name
        );
        if t.numel() <= MAX_NUMEL
            && let Ok(Some(tern)) = file.ternary(t)
        {
            assert_eq!(tern.trits.len() as u64, t.numel());
        }
    }
    // Rewrite and reparse (our writer packs tensors back to back, so offsets may change).
    let specs: Vec<TensorSpec> = file
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    let plan = GgufPlan::new(file.kv(), specs).expect("what the reader accepts, the writer plans");
    let mut w = GgufWriter::new(Vec::new(), plan, Path::new("fuzz.gguf")).expect("write to memory");
    for t in file.tensors() {
        w.write_tensor(&t.name, file.tensor_data(t))
            .expect("sizes come from the same plan");
    }
    let bytes = w.finish().expect("all tensors written");
    let again = parse(&bytes).expect("our own output parses");
    assert_eq!(again.kv().len(), file.kv().len());
    for ((k1, v1), (k2, v2)) in again.kv().iter().zip(file.kv()) {
        assert_eq!(k1, k2);
        // NaN payloads compare unequal; compare the re-read value with itself written again.
        if v1 == v1 {
            assert_eq!(v1, v2, "key {k1}");
        }
    }
    for (a, b) in again.tensors().iter().zip(file.tensors()) {
        assert_eq!((&a.name, &a.dims, a.ty), (&b.name, &b.dims, b.ty));
        assert_eq!(again.tensor_data(a), file.tensor_data(b));
    }
});
