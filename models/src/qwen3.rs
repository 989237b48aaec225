//! Qwen3: the Llama block with an RMSNorm on each query and key head before rotary
//! embeddings (and no projection biases), rotary embeddings over NeoX halves.

use kiln_runtime::{Backend, RopeStyle};

use crate::blocks::AttnExtras;
use crate::llama::{self, Llama};
use crate::{Checkpoint, Hyper, ModelError};

pub fn load(ck: &Checkpoint, hyper: Hyper, be: &mut dyn Backend) -> Result<Llama, ModelError> {
    let extras = AttnExtras {
        qkv_bias: false,
        qk_norm: true,
    };
    llama::load_family(ck, hyper, be, extras, RopeStyle::Neox)
}
