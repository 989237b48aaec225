//! What the GPU tests share: the adapter they run on and a small random generator.

/// The first GPU adapter, or `None` (said once) when `KILN_NO_GPU=1`. Panics when there is
/// none: Mesa's lavapipe is one, and CI installs it.
pub fn adapter() -> Option<wgpu::Adapter> {
    if std::env::var("KILN_NO_GPU").as_deref() == Ok("1") {
        println!("KILN_NO_GPU=1: GPU tests skipped");
        return None;
    }
    let adapter = kiln_runtime::adapters().into_iter().next().expect(
        "no GPU adapter: install a Vulkan driver (Debian: mesa-vulkan-drivers libvulkan1) or set KILN_NO_GPU=1",
    );
    Some(adapter)
}

/// xorshift64: enough randomness for test inputs, reproducible from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
