// Shared by the attention kernels (compiled after common.wgsl, before the kernel, whose
// `arena` binding it reads): an item's (query row, position, first page-table entry) at
// arena[u6 + 3 · item ..], read once per workgroup, and the first key a query at `pos`
// sees (u5: the sliding window, 0 for none).
var<workgroup> item_info: vec3<u32>;

fn load_item(item: u32, lid: u32) -> vec3<u32> {
    if lid == 0u {
        let at = P.u6 + 3u * item;
        item_info = vec3<u32>(arena[at], arena[at + 1u], arena[at + 2u]);
    }
    return workgroupUniformLoad(&item_info);
}

fn first_key(pos: u32) -> u32 {
    if P.u5 != 0u && pos + 1u > P.u5 {
        return pos + 1u - P.u5;
    }
    return 0u;
}
