//! GGUF import (being written).
