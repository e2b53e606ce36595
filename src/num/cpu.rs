//! CPU feature detection for the kernels that have AVX2 and AVX-512 builds.

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

/// Whether this CPU has every extension the AVX-512 ternary kernels use: AVX-512 F, BW and VL
/// (byte operations on 256- and 512-bit vectors) and VNNI (`vpdpbusd`, four u8 x i8 products
/// summed into each i32 lane).
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
