//! CPU feature detection for the kernels that have an AVX2 build.

/// Whether the AVX2 builds of the kernels are used on this CPU.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
