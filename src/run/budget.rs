//! How much memory a forward pass over `n` tokens needs, checked before it starts: a token
//! count is an argument a user types, and a large one must be an error that says what it would
//! cost, not an allocation failure that aborts the process half way.

use crate::model::ModelConfig;

/// Bytes of memory a forward pass of `n` new tokens (after `past` cached positions) allocates
/// beyond the model's weights: logits for every position, the residual stream and the
/// activations of one block, the attention state of every block, and the attention scores.
/// `record` adds what parity keeps (every projection's input and output for one block, on two
/// models, the hidden state after every block, and three sets of logits).
pub fn forward_bytes(cfg: &ModelConfig, n: usize, past: usize, record: bool) -> u128 {
    let (n, past) = (n as u128, past as u128);
    let (h, f, v) = (
        cfg.hidden_size as u128,
        cfg.intermediate_size as u128,
        cfg.vocab_size as u128,
    );
    let (q, kv, layers) = (
        (cfg.num_heads * cfg.head_dim) as u128,
        (cfg.num_kv_heads * cfg.head_dim) as u128,
        cfg.num_layers as u128,
    );
    let f32s = |count: u128| count * 4;
    let logits = f32s(n * v);
    // Residual, normed, q/k/v, attention output, o, gate, up, down: one block at a time.
    let block = f32s(n * (4 * h + q + 2 * kv + q + 3 * f));
    let cache = f32s(layers * (past + n) * 2 * kv);
    // One score per visible position, for as many (token, head) pairs as run at once.
    let scores = f32s(rayon::current_num_threads() as u128 * (past + n));
    let mut total = logits + block + cache + scores;
    if record {
        let per_block_io = f32s(n * (3 * h + q + 2 * kv + h + h + 2 * f + f + h + q));
        total += 2 * per_block_io + f32s(layers * n * h) * 2 + 2 * logits;
    }
    total
}

/// Physical memory of the machine in bytes, if the system says.
pub fn physical_memory() -> Option<u128> {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| pages as u128 * size as u128)
}

/// A token count whose forward pass would not fit in memory.
#[derive(Debug, thiserror::Error)]
#[error(
    "{tokens} tokens would need about {} GiB for activations and logits, more than the {} GiB available for them (three quarters of this machine's memory); use fewer tokens",
    gib(*needed),
    gib(*available)
)]
pub struct TooLarge {
    pub tokens: usize,
    pub needed: u128,
    pub available: u128,
}

fn gib(b: u128) -> String {
    format!("{:.1}", b as f64 / (1u64 << 30) as f64)
}

/// Checks that a forward pass of `n` tokens fits in the machine's memory (with the weights
/// mapped beside it: at most three quarters of it for activations).
pub fn check(cfg: &ModelConfig, n: usize, past: usize, record: bool) -> Result<(), TooLarge> {
    let needed = forward_bytes(cfg, n, past, record);
    let available = physical_memory().unwrap_or(u128::MAX) / 4 * 3;
    if needed > available {
        return Err(TooLarge {
            tokens: n,
            needed,
            available,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vocab: usize, max_positions: usize) -> ModelConfig {
        let text = format!(
            r#"{{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","hidden_size":2560,
            "intermediate_size":6912,"num_hidden_layers":30,"num_attention_heads":20,
            "num_key_value_heads":5,"vocab_size":{vocab},"max_position_embeddings":{max_positions}}}"#
        );
        ModelConfig::from_json(text.as_bytes()).unwrap()
    }

    #[test]
    fn estimates_grow_with_tokens_and_refuse_what_cannot_fit() {
        let c = cfg(128_256, 1 << 20);
        // 2B4T logits alone: 128256 x 4 bytes per position.
        let one = forward_bytes(&c, 1, 0, false);
        assert!(one >= 128_256 * 4, "{one}");
        let many = forward_bytes(&c, 4096, 0, false);
        assert!(many >= 4096 * 128_256 * 4);
        assert!(forward_bytes(&c, 4096, 0, true) > 2 * many);
        // A million positions of 2B4T logits is half a terabyte: refused, with the figures.
        let e = check(&c, 1 << 20, 0, false).unwrap_err();
        assert_eq!(e.tokens, 1 << 20);
        assert!(e.needed > e.available);
        assert!(e.to_string().contains("use fewer tokens"));
        assert!(check(&c, 16, 0, true).is_ok());
    }
}
