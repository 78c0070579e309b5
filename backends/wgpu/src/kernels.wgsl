// jointdiff's compute kernels: every operation NCSNv2 and the sampler need, forward and backward.
// One invocation per output value unless a kernel says otherwise; each value is a fixed sequential sum, so
// results do not depend on the dispatch (deterministic). Layout NCHW, f32.
//
// Bindings (one layout for every kernel): 0 the parameters, 1..6 inputs, 7 the output, 8 a flag.

struct Params {
    u0: vec4<u32>,
    u1: vec4<u32>,
    u2: vec4<u32>,
    u3: vec4<u32>,
    f0: vec4<f32>,
    f1: vec4<f32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in0: array<f32>;
@group(0) @binding(2) var<storage, read> in1: array<f32>;
@group(0) @binding(3) var<storage, read> in2: array<f32>;
@group(0) @binding(4) var<storage, read> in3: array<f32>;
@group(0) @binding(5) var<storage, read> in4: array<f32>;
@group(0) @binding(6) var<storage, read> in5: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read_write> flag: array<atomic<u32>>;

const WG: u32 = 64u;

// The invocation's index over a 2-D grid of workgroups (more than 65535 groups go to y).
fn index(id: vec3<u32>, nw: vec3<u32>) -> u32 {
    return id.x + id.y * nw.x * WG;
}

// ---- elementwise -----------------------------------------------------------------------------------
// u0.x = length; for broadcasts u0.y = length of one item of the second operand.

@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    out[i] = in0[i] + in1[i];
}

// f0.x * x + f0.y
@compute @workgroup_size(64)
fn affine(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    out[i] = p.f0.x * in0[i] + p.f0.y;
}

// f0.x * x + f0.y * y
@compute @workgroup_size(64)
fn axpby(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    out[i] = p.f0.x * in0[i] + p.f0.y * in1[i];
}

@compute @workgroup_size(64)
fn mul_b(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    out[i] = in0[i] * in1[i % p.u0.y];
}

@compute @workgroup_size(64)
fn div_b(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    out[i] = in0[i] / in1[i % p.u0.y];
}

@compute @workgroup_size(64)
fn mul_s(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    out[i] = p.f0.x * in0[i];
}

@compute @workgroup_size(64)
fn div_s(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    out[i] = in0[i] / p.f0.x;
}

// f32::clamp: NaN stays NaN
@compute @workgroup_size(64)
fn clamp_k(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    let v = in0[i];
    var r = v;
    if (v < p.f0.x) { r = p.f0.x; }
    if (v > p.f0.y) { r = p.f0.y; }
    out[i] = r;
}

fn elu1(v: f32) -> f32 {
    if (v > 0.0) { return v; }
    return exp(v) - 1.0;
}

@compute @workgroup_size(64)
fn elu(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    out[i] = elu1(in0[i]);
}

// in0 = x, in1 = upstream gradient
@compute @workgroup_size(64)
fn elu_bwd(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    let v = in0[i];
    if (v > 0.0) { out[i] = in1[i]; } else { out[i] = in1[i] * exp(v); }
}

// Sets flag[0] to 1 if any value is NaN or infinite.
@compute @workgroup_size(64)
fn finite(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    let b = bitcast<u32>(in0[i]);
    if ((b & 0x7f800000u) == 0x7f800000u) { atomicOr(&flag[0], 1u); }
}

// ---- sampler ---------------------------------------------------------------------------------------

// One invocation per item: ||x_i|| (u0.x = items, u0.y = item length).
@compute @workgroup_size(64)
fn item_norm(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    let l = p.u0.y;
    var s = 0.0;
    for (var k = 0u; k < l; k++) {
        let v = in0[i * l + k];
        s += v * v;
    }
    out[i] = sqrt(s);
}

// x_i * (c / ||x_i||), 0 where the norm is 0 (in1 = norms; u0.y = item length, f0.x = c)
@compute @workgroup_size(64)
fn scale_inv_norm(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    let n = in1[i / p.u0.y];
    var inv = 0.0;
    if (n > 0.0) { inv = p.f0.x / n; }
    out[i] = in0[i] * inv;
}

// Per item: A x (u0.w = 0) or A^T x (u0.w = 1), A row-major m x d (u0.y = m, u0.z = d); u0.x = outputs.
@compute @workgroup_size(64)
fn matmul(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    let m = p.u0.y;
    let d = p.u0.z;
    var s = 0.0;
    if (p.u0.w == 0u) {
        let item = i / m;
        let r = i % m;
        for (var k = 0u; k < d; k++) { s += in1[r * d + k] * in0[item * d + k]; }
    } else {
        let item = i / d;
        let c = i % d;
        for (var k = 0u; k < m; k++) { s += in0[item * m + k] * in1[k * d + c]; }
    }
    out[i] = s;
}

// -(z - a mean) / (a^2 var + s^2); u0.y = item length, u0.z = 1 with a mean (in1), in2 = var;
// f0 = (a, a^2, s^2)
@compute @workgroup_size(64)
fn gaussian_score(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = index(id, nw);
    if (i >= p.u0.x) { return; }
    let j = i % p.u0.y;
    var num = in0[i];
    if (p.u0.z == 1u) { num = num - p.f0.x * in1[j]; }
    out[i] = -num / (p.f0.y * in2[j] + p.f0.z);
}

// ---- convolution (stride 1, symmetric zero padding, dilation) ----------------------------------------
// u0 = (N, CI, H, W), u1 = (CO, HO, WO, KH), u2 = (KW, pad, dil, has_bias). The forward convolution is
// `conv2d_tiled` (below); the input gradient runs on it too (the flipped kernel) unless the padding exceeds
// the kernel's reach, where the direct kernel here takes it.

// The input gradient: in0 = weight, in1 = output gradient; one invocation per input value.
@compute @workgroup_size(64)
fn conv2d_bwd_input(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n_ = p.u0.x; let ci = p.u0.y; let h = p.u0.z; let w = p.u0.w;
    let co = p.u1.x; let ho = i32(p.u1.y); let wo = i32(p.u1.z); let kh = p.u1.w;
    let kw = p.u2.x; let pad = i32(p.u2.y); let dil = i32(p.u2.z);
    let i = index(id, nw);
    if (i >= n_ * ci * h * w) { return; }
    let x = i32(i % w);
    let y = i32((i / w) % h);
    let c = (i / (w * h)) % ci;
    let n = i / (w * h * ci);
    var s = 0.0;
    for (var o = 0u; o < co; o++) {
        let gb = (n * co + o) * u32(ho * wo);
        let wb = (o * ci + c) * kh * kw;
        for (var ky = 0u; ky < kh; ky++) {
            let oy = y + pad - i32(ky) * dil;
            if (oy < 0 || oy >= ho) { continue; }
            for (var kx = 0u; kx < kw; kx++) {
                let ox = x + pad - i32(kx) * dil;
                if (ox < 0 || ox >= wo) { continue; }
                s += in0[wb + ky * kw + kx] * in1[gb + u32(oy * wo + ox)];
            }
        }
    }
    out[i] = s;
}

// The weight gradient: in0 = input, in1 = output gradient; one invocation per weight.
@compute @workgroup_size(64)
fn conv2d_bwd_weight(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n_ = p.u0.x; let ci = p.u0.y; let h = i32(p.u0.z); let w = i32(p.u0.w);
    let co = p.u1.x; let ho = p.u1.y; let wo = p.u1.z; let kh = p.u1.w;
    let kw = p.u2.x; let pad = i32(p.u2.y); let dil = i32(p.u2.z);
    let i = index(id, nw);
    if (i >= co * ci * kh * kw) { return; }
    let kx = i % kw;
    let ky = (i / kw) % kh;
    let c = (i / (kw * kh)) % ci;
    let o = i / (kw * kh * ci);
    var s = 0.0;
    for (var n = 0u; n < n_; n++) {
        let gb = (n * co + o) * ho * wo;
        let xb = (n * ci + c) * u32(h * w);
        for (var oy = 0u; oy < ho; oy++) {
            let y = i32(oy) + i32(ky) * dil - pad;
            if (y < 0 || y >= h) { continue; }
            for (var ox = 0u; ox < wo; ox++) {
                let x = i32(ox) + i32(kx) * dil - pad;
                if (x < 0 || x >= w) { continue; }
                s += in1[gb + oy * wo + ox] * in0[xb + u32(y * w + x)];
            }
        }
    }
    out[i] = s;
}

// The bias gradient: in1 = output gradient; one invocation per output channel.
@compute @workgroup_size(64)
fn conv2d_bwd_bias(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n_ = p.u0.x;
    let co = p.u1.x; let hw = p.u1.y * p.u1.z;
    let o = index(id, nw);
    if (o >= co) { return; }
    var s = 0.0;
    for (var n = 0u; n < n_; n++) {
        for (var k = 0u; k < hw; k++) { s += in1[(n * co + o) * hw + k]; }
    }
    out[o] = s;
}

// ---- pooling and resizing --------------------------------------------------------------------------
// u0 = (planes, H, W, _), u1 = (HO, WO, k, pad)

@compute @workgroup_size(64)
fn mean_pool2(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let h = p.u0.y; let w = p.u0.z; let ho = h / 2u; let wo = w / 2u;
    let i = index(id, nw);
    if (i >= p.u0.x * ho * wo) { return; }
    let ox = i % wo; let oy = (i / wo) % ho; let pl = i / (wo * ho);
    let b = pl * h * w + 2u * oy * w + 2u * ox;
    out[i] = (in0[b] + in0[b + 1u] + in0[b + w] + in0[b + w + 1u]) / 4.0;
}

@compute @workgroup_size(64)
fn mean_pool2_bwd(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let h = p.u0.y; let w = p.u0.z; let ho = h / 2u; let wo = w / 2u;
    let i = index(id, nw);
    if (i >= p.u0.x * h * w) { return; }
    let x = i % w; let y = (i / w) % h; let pl = i / (w * h);
    out[i] = in0[pl * ho * wo + (y / 2u) * wo + x / 2u] / 4.0;
}

// window of output (oy, ox): rows [max(oy - pad, 0), min(oy + k - pad, h))
@compute @workgroup_size(64)
fn max_pool(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let h = i32(p.u0.y); let w = i32(p.u0.z);
    let ho = p.u1.x; let wo = p.u1.y; let k = i32(p.u1.z); let pad = i32(p.u1.w);
    let i = index(id, nw);
    if (i >= p.u0.x * ho * wo) { return; }
    let ox = i32(i % wo); let oy = i32((i / wo) % ho); let pl = i / (wo * ho);
    let b = pl * u32(h * w);
    var m = bitcast<f32>(0xff800000u);
    for (var y = max(oy - pad, 0); y < min(oy + k - pad, h); y++) {
        for (var x = max(ox - pad, 0); x < min(ox + k - pad, w); x++) {
            let v = in0[b + u32(y * w + x)];
            if (v > m || v != v) { m = v; }
        }
    }
    out[i] = m;
}

// Each output's gradient goes to the first maximum of its window (as the reference); one invocation per
// input value, which looks at every window that contains it. in0 = x, in1 = output gradient.
@compute @workgroup_size(64)
fn max_pool_bwd(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let h = i32(p.u0.y); let w = i32(p.u0.z);
    let ho = i32(p.u1.x); let wo = i32(p.u1.y); let k = i32(p.u1.z); let pad = i32(p.u1.w);
    let i = index(id, nw);
    if (i >= p.u0.x * u32(h * w)) { return; }
    let xx = i32(i % u32(w)); let yy = i32((i / u32(w)) % u32(h)); let pl = i / u32(w * h);
    let b = pl * u32(h * w);
    let me = yy * w + xx;
    var s = 0.0;
    for (var oy = max(yy + pad - k + 1, 0); oy <= min(yy + pad, ho - 1); oy++) {
        for (var ox = max(xx + pad - k + 1, 0); ox <= min(xx + pad, wo - 1); ox++) {
            var best = bitcast<f32>(0xff800000u);
            var at = -1;
            for (var y = max(oy - pad, 0); y < min(oy + k - pad, h); y++) {
                for (var x = max(ox - pad, 0); x < min(ox + k - pad, w); x++) {
                    let v = in0[b + u32(y * w + x)];
                    if (v > best || at < 0) { best = v; at = y * w + x; }
                }
            }
            if (at == me) { s += in1[pl * u32(ho * wo) + u32(oy * wo + ox)]; }
        }
    }
    out[i] = s;
}

struct Taps { i0: u32, i1: u32, l0: f32, l1: f32, }

// align_corners = True, as the reference's bilinear_coeffs
fn taps(out_len: u32, in_len: u32, i: u32) -> Taps {
    var scale = 0.0;
    if (out_len > 1u) { scale = (f32(in_len) - 1.0) / (f32(out_len) - 1.0); }
    let src = scale * f32(i);
    let i0 = min(u32(src), in_len - 1u);
    var i1 = i0;
    if (i0 + 1u < in_len) { i1 = i0 + 1u; }
    let l1 = src - f32(i0);
    return Taps(i0, i1, 1.0 - l1, l1);
}

@compute @workgroup_size(64)
fn resize_bilinear(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let h = p.u0.y; let w = p.u0.z; let ho = p.u1.x; let wo = p.u1.y;
    let i = index(id, nw);
    if (i >= p.u0.x * ho * wo) { return; }
    let ox = i % wo; let oy = (i / wo) % ho; let pl = i / (wo * ho);
    let ty = taps(ho, h, oy); let tx = taps(wo, w, ox);
    let b = pl * h * w;
    out[i] = ty.l0 * (tx.l0 * in0[b + ty.i0 * w + tx.i0] + tx.l1 * in0[b + ty.i0 * w + tx.i1])
        + ty.l1 * (tx.l0 * in0[b + ty.i1 * w + tx.i0] + tx.l1 * in0[b + ty.i1 * w + tx.i1]);
}

// The outputs (along one axis) whose taps can reach input index `i`: src = scale * o must lie in
// [i - 1, i + 1), widened by 2 for rounding; all of them when the output has one value.
fn reach(out_len: u32, in_len: u32, i: u32) -> vec2<u32> {
    if (out_len <= 1u || in_len <= 1u) { return vec2<u32>(0u, out_len); }
    let scale = (f32(in_len) - 1.0) / (f32(out_len) - 1.0);
    let lo = max(floor((f32(i) - 1.0) / scale) - 2.0, 0.0);
    let hi = min(ceil((f32(i) + 1.0) / scale) + 2.0, f32(out_len));
    return vec2<u32>(u32(lo), u32(hi));
}

// One invocation per input value: the sum over the outputs whose taps reach it, in the reference's order
// (only the outputs in reach are visited; the tap tests below decide).
@compute @workgroup_size(64)
fn resize_bilinear_bwd(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let h = p.u0.y; let w = p.u0.z; let ho = p.u1.x; let wo = p.u1.y;
    let i = index(id, nw);
    if (i >= p.u0.x * h * w) { return; }
    let x = i % w; let y = (i / w) % h; let pl = i / (w * h);
    let ry = reach(ho, h, y);
    let rx = reach(wo, w, x);
    var s = 0.0;
    for (var oy = ry.x; oy < ry.y; oy++) {
        let ty = taps(ho, h, oy);
        if (ty.i0 != y && ty.i1 != y) { continue; }
        for (var ox = rx.x; ox < rx.y; ox++) {
            let tx = taps(wo, w, ox);
            let g = in0[pl * ho * wo + oy * wo + ox];
            if (ty.i0 == y && tx.i0 == x) { s += g * ty.l0 * tx.l0; }
            if (ty.i0 == y && tx.i1 == x) { s += g * ty.l0 * tx.l1; }
            if (ty.i1 == y && tx.i0 == x) { s += g * ty.l1 * tx.l0; }
            if (ty.i1 == y && tx.i1 == x) { s += g * ty.l1 * tx.l1; }
        }
    }
    out[i] = s;
}

// ---- InstanceNorm++ ---------------------------------------------------------------------------------
// u0 = (N, C, HW, elu)

// One invocation per plane (n, c): mean, biased variance (two passes).
@compute @workgroup_size(64)
fn inorm_plane_stats(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let hw = p.u0.z;
    let pl = index(id, nw);
    if (pl >= p.u0.x * p.u0.y) { return; }
    var s = 0.0;
    for (var k = 0u; k < hw; k++) { s += in0[pl * hw + k]; }
    let mean = s / f32(hw);
    var v = 0.0;
    for (var k = 0u; k < hw; k++) { let d = in0[pl * hw + k] - mean; v += d * d; }
    out[2u * pl] = mean;
    out[2u * pl + 1u] = v / f32(hw);
}

// One invocation per image n: mean of the channel means and sqrt(unbiased variance + 1e-5). in0 = plane stats.
@compute @workgroup_size(64)
fn inorm_image_stats(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let c = p.u0.y;
    let n = index(id, nw);
    if (n >= p.u0.x) { return; }
    var s = 0.0;
    for (var k = 0u; k < c; k++) { s += in0[2u * (n * c + k)]; }
    let m = s / f32(c);
    var v = 0.0;
    for (var k = 0u; k < c; k++) { let d = in0[2u * (n * c + k)] - m; v += d * d; }
    out[2u * n] = m;
    out[2u * n + 1u] = sqrt(v / (f32(c) - 1.0) + 1e-5);
}

// gamma ((x - mu) / sqrt(var + 1e-5) + alpha (mu - m) / vs) + beta, then ELU if u0.w = 1.
// in0 = x, in1 = plane stats, in2 = image stats, in3 = alpha, in4 = gamma, in5 = beta.
@compute @workgroup_size(64)
fn inorm_apply(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let c = p.u0.y; let hw = p.u0.z;
    let i = index(id, nw);
    if (i >= p.u0.x * c * hw) { return; }
    let pl = i / hw; let ch = pl % c; let n = pl / c;
    let mu = in1[2u * pl];
    let inv = 1.0 / sqrt(in1[2u * pl + 1u] + 1e-5);
    let mt = (mu - in2[2u * n]) / in2[2u * n + 1u];
    var v = in4[ch] * ((in0[i] - mu) * inv + in3[ch] * mt) + in5[ch];
    if (p.u0.w == 1u) { v = elu1(v); }
    out[i] = v;
}

// Backward, per plane (n, c): (sum of g, sum of g h, g_mt = gamma alpha sum g). in0 = x, in1 = gout,
// in2 = plane stats, in3 = image stats, in4 = alpha, in5 = gamma.
@compute @workgroup_size(64)
fn inorm_bwd_plane(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let c = p.u0.y; let hw = p.u0.z;
    let pl = index(id, nw);
    if (pl >= p.u0.x * c) { return; }
    let ch = pl % c;
    let mu = in2[2u * pl];
    let sd = sqrt(in2[2u * pl + 1u] + 1e-5);
    var sg = 0.0;
    var sgh = 0.0;
    for (var k = 0u; k < hw; k++) {
        let g = in1[pl * hw + k];
        sg += g;
        sgh += g * (in0[pl * hw + k] - mu) / sd;
    }
    out[3u * pl] = sg;
    out[3u * pl + 1u] = sgh;
    out[3u * pl + 2u] = in5[ch] * in4[ch] * sg;
}

// Backward, per plane (n, j): the gradient reaching mu_j through the mean correction. in0 = plane stats,
// in1 = image stats, in2 = per-plane sums.
@compute @workgroup_size(64)
fn inorm_bwd_mu(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let c = p.u0.y;
    let pl = index(id, nw);
    if (pl >= p.u0.x * c) { return; }
    let n = pl / c;
    let m = in1[2u * n]; let sv = in1[2u * n + 1u];
    var sum_gmt = 0.0;
    var dot = 0.0;
    for (var k = 0u; k < c; k++) {
        let q = in2[3u * (n * c + k) + 2u];
        sum_gmt += q;
        dot += q * (in0[2u * (n * c + k)] - m);
    }
    let mu_j = in0[2u * pl];
    out[pl] = (in2[3u * pl + 2u] - sum_gmt / f32(c)) / sv
        - dot * (mu_j - m) / ((f32(c) - 1.0) * sv * sv * sv);
}

// Backward, the input gradient. in0 = x, in1 = gout, in2 = plane stats, in3 = gamma, in4 = per-plane sums,
// in5 = gradient of mu.
@compute @workgroup_size(64)
fn inorm_bwd_x(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let c = p.u0.y; let hw = p.u0.z;
    let i = index(id, nw);
    if (i >= p.u0.x * c * hw) { return; }
    let pl = i / hw; let ch = pl % c;
    let mu = in2[2u * pl];
    let sd = sqrt(in2[2u * pl + 1u] + 1e-5);
    let g = in3[ch];
    let mean_gh = g * in4[3u * pl] / f32(hw);
    let mean_gh_h = g * in4[3u * pl + 1u] / f32(hw);
    let hv = (in0[i] - mu) / sd;
    out[i] = (in1[i] * g - mean_gh - hv * mean_gh_h) / sd + in5[pl] / f32(hw);
}

// Backward, the parameter gradients: out[c] = d alpha, out[C + c] = d gamma, out[2C + c] = d beta; one
// invocation per channel. in0 = plane stats, in1 = image stats, in2 = per-plane sums, in3 = alpha,
// in4 = gamma.
@compute @workgroup_size(64)
fn inorm_bwd_params(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let n_ = p.u0.x; let c = p.u0.y;
    let ch = index(id, nw);
    if (ch >= c) { return; }
    var ga = 0.0; var gg = 0.0; var gb = 0.0;
    for (var n = 0u; n < n_; n++) {
        let pl = n * c + ch;
        let mt = (in0[2u * pl] - in1[2u * n]) / in1[2u * n + 1u];
        let sg = in2[3u * pl];
        gb += sg;
        gg += in2[3u * pl + 1u] + in3[ch] * mt * sg;
        ga += in4[ch] * mt * sg;
    }
    out[ch] = ga;
    out[c + ch] = gg;
    out[2u * c + ch] = gb;
}

// ---- convolution as an implicit GEMM with shared-memory tiles ---------------------------------------
// O[CO, N*HO*WO] = W[CO, CI*KH*KW] x im2col(X)[CI*KH*KW, N*HO*WO], the im2col matrix never stored: each
// workgroup computes a 32 x 64 tile of O (4 x 8 per invocation), loading 16-deep slices of W and of the
// implicit im2col matrix into workgroup memory. Every output is one sequential sum over k (then the bias):
// the same order whatever the grid. Parameters as `conv2d`; workgroups (pixel tiles, channel tiles).

const BM: u32 = 32u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const TM: u32 = 4u;
const TN: u32 = 8u;

var<workgroup> tile_a: array<f32, 512>;   // BK x BM
var<workgroup> tile_b: array<f32, 1024>;  // BK x BN

@compute @workgroup_size(64)
fn conv2d_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n_ = p.u0.x; let ci = p.u0.y; let h = i32(p.u0.z); let w = i32(p.u0.w);
    let co = p.u1.x; let ho = p.u1.y; let wo = p.u1.z; let kh = p.u1.w;
    let kw = p.u2.x; let pad = i32(p.u2.y); let dil = i32(p.u2.z);
    let khw = kh * kw;
    let kk_total = ci * khw;
    let hwo = ho * wo;
    let pix_total = n_ * hwo;
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tr = lid / 8u;
    let tc = lid % 8u;
    var acc: array<f32, 32>;
    for (var q = 0u; q < 32u; q++) { acc[q] = 0.0; }
    for (var k0 = 0u; k0 < kk_total; k0 += BK) {
        for (var t = 0u; t < 8u; t++) {
            let e = lid + t * 64u;
            let r = e / BK;
            let kk = e % BK;
            let m = m0 + r;
            let k = k0 + kk;
            var v = 0.0;
            if (m < co && k < kk_total) { v = in1[m * kk_total + k]; }
            tile_a[kk * BM + r] = v;
        }
        for (var t = 0u; t < 16u; t++) {
            let e = lid + t * 64u;
            let kk = e / BN;
            let c = e % BN;
            let k = k0 + kk;
            let pix = n0 + c;
            var v = 0.0;
            if (k < kk_total && pix < pix_total) {
                let cin = k / khw;
                let ky = i32((k % khw) / kw);
                let kx = i32(k % kw);
                let nn = pix / hwo;
                let rem = pix % hwo;
                let y = i32(rem / wo) + ky * dil - pad;
                let x = i32(rem % wo) + kx * dil - pad;
                if (y >= 0 && y < h && x >= 0 && x < w) {
                    v = in0[(nn * ci + cin) * u32(h * w) + u32(y * w + x)];
                }
            }
            tile_b[kk * BN + c] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 4>;
            for (var i = 0u; i < TM; i++) { a[i] = tile_a[kk * BM + tr * TM + i]; }
            for (var j = 0u; j < TN; j++) {
                let b = tile_b[kk * BN + tc * TN + j];
                for (var i = 0u; i < TM; i++) { acc[i * TN + j] += a[i] * b; }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let m = m0 + tr * TM + i;
        if (m >= co) { continue; }
        var bias = 0.0;
        if (p.u2.w == 1u) { bias = in2[m]; }
        for (var j = 0u; j < TN; j++) {
            let pix = n0 + tc * TN + j;
            if (pix >= pix_total) { continue; }
            let nn = pix / hwo;
            out[(nn * co + m) * hwo + pix % hwo] = acc[i * TN + j] + bias;
        }
    }
}

// The kernel whose forward convolution is the input gradient: wt[i][o][y][x] = w[o][i][kh-1-y][kw-1-x].
// u0 = (CO, CI, KH, KW)
@compute @workgroup_size(64)
fn flip_transpose(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let co = p.u0.x; let ci = p.u0.y; let kh = p.u0.z; let kw = p.u0.w;
    let i = index(id, nw);
    if (i >= co * ci * kh * kw) { return; }
    let x = i % kw; let y = (i / kw) % kh; let o = (i / (kw * kh)) % co; let c = i / (kw * kh * co);
    out[i] = in0[((o * ci + c) * kh + (kh - 1u - y)) * kw + (kw - 1u - x)];
}
