"""Weight quantizers (`quantizer=...`) and the one quantized-weight format they all produce."""
