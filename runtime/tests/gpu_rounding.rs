//! The GPU kernels' correctly rounded division and square root (`div_rn`, `sqrt_rn` in
//! `common.wgsl`) against the CPU's IEEE `/` and `sqrt`, bit for bit, on a million
//! operands: random significands over a wide range of exponents, quotients and roots
//! next to powers of two, exact quotients and squares. The kernels' norms and
//! quantization depend on them to round as the CPU does. Operands whose results leave
//! the normal range are not drawn: there both take the driver's operations. Fails when
//! no GPU adapter exists (Mesa's lavapipe is one) unless `KILN_NO_GPU=1`.

use wgpu::util::DeviceExt;

mod common;

use common::Rng;

/// A kernel applying both functions to pairs `(a, b)`: `(div_rn(a, b), sqrt_rn(a))`.
const KERNEL: &str = "
@group(0) @binding(1) var<storage, read> operands: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> results: array<vec2<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    let i = id.y * n.x * 64u + id.x;
    if i < arrayLength(&operands) {
        let v = operands[i];
        results[i] = vec2<f32>(div_rn(v.x, v.y), sqrt_rn(v.x));
    }
}
";

impl Rng {
    /// A positive normal float with a random significand and exponent in `-range..range`.
    fn float(&mut self, range: i32) -> f32 {
        let r = self.next();
        let exp = (r % (2 * range as u64)) as i32 - range + 127;
        f32::from_bits(((exp as u32) << 23) | ((r >> 32) as u32 & 0x7f_ffff))
    }
}

/// The operand pairs: random ones, then cases at the edges of the correction steps.
fn operands(n: usize) -> Vec<[f32; 2]> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let (a, b) = (rng.float(60), rng.float(60));
        let sign = if rng.next() & 1 == 0 { 1.0 } else { -1.0 };
        v.push([a, b * sign]);
        // a = q · b exactly (a quotient with few significant bits), and its neighbours.
        let q = (rng.next() % 4096 + 1) as f32;
        let exact = q * b;
        if exact.is_normal() && exact as f64 == q as f64 * b as f64 {
            for d in [-1i32, 0, 1] {
                v.push([f32::from_bits((exact.to_bits() as i32 + d) as u32), b]);
            }
        }
        // Significands at the ends of their range: quotients near 1 and 2, roots near
        // powers of two, and squares and their neighbours.
        let ones = f32::from_bits((a.to_bits() & !0x7f_ffff) | 0x7f_ffff);
        v.push([ones, f32::from_bits(b.to_bits() & !0x7f_ffff)]);
        v.push([f32::from_bits(b.to_bits() & !0x7f_ffff), ones]);
        let root = rng.float(30);
        let square = root * root;
        for d in [-1i32, 0, 1] {
            v.push([f32::from_bits((square.to_bits() as i32 + d) as u32), root]);
        }
    }
    v.truncate(n);
    v
}

#[test]
fn division_and_square_root_round_as_ieee() {
    let Some(adapter) = common::adapter() else { return };
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default()))
        .expect("a device on the adapter");
    let pairs = operands(1 << 20);
    let bytes: Vec<u8> = pairs.iter().flatten().flat_map(|f| f.to_le_bytes()).collect();
    let input = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: &bytes,
        usage: wgpu::BufferUsages::STORAGE,
    });
    let size = bytes.len() as u64;
    let output = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let source = format!("{}{KERNEL}", kiln_kernels::wgsl::COMMON);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 1,
                resource: input.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: output.as_entire_binding(),
            },
        ],
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        let groups = pairs.len().div_ceil(64) as u32;
        pass.dispatch_workgroups(groups.min(65535), groups.div_ceil(65535), 1);
    }
    encoder.copy_buffer_to_buffer(&output, 0, &readback, 0, size);
    queue.submit([encoder.finish()]);
    let slice = readback.slice(..);
    slice.map_async(wgpu::MapMode::Read, |r| r.expect("mapping the results"));
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("waiting for the GPU");
    let view = slice.get_mapped_range().expect("mapped");
    let results: Vec<f32> = view
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut wrong = Vec::new();
    for (i, [a, b]) in pairs.iter().enumerate() {
        let (quotient, root) = (a / b, a.sqrt());
        for (what, want, got) in [
            ("a / b", quotient, results[2 * i]),
            ("sqrt(a)", root, results[2 * i + 1]),
        ] {
            if want.is_normal() && want.to_bits() != got.to_bits() {
                wrong.push(format!("{what} for a = {a:e}, b = {b:e}: {got:e}, IEEE {want:e}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} results differ from IEEE rounding, e.g.\n{}",
        wrong.len(),
        2 * pairs.len(),
        wrong[..wrong.len().min(5)].join("\n")
    );
}
