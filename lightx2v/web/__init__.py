"""Front ends: the Gradio page (`python -m lightx2v.web.ui`) and the form derivation it shares
with the ComfyUI nodes (comfyui/lightx2v_nodes). Importing this package imports no UI library."""
