//! Qwen2 (Qwen2.5, Qwen2.5-Coder): the Llama block with biases on the query, key and
//! value projections, and rotary embeddings over NeoX halves.

use kiln_runtime::{Backend, RopeStyle};

use crate::blocks::AttnExtras;
use crate::llama::{self, Llama};
use crate::{Checkpoint, Hyper, ModelError};

pub fn load(ck: &Checkpoint, hyper: Hyper, be: &mut dyn Backend) -> Result<Llama, ModelError> {
    let extras = AttnExtras {
        qkv_bias: true,
        qk_norm: false,
    };
    llama::load_family(ck, hyper, be, extras, RopeStyle::Neox)
}
