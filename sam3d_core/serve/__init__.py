"""The worker process (`sam3d serve`) and its thin-client protocol.

`protocol` and `client` are stdlib only (Blender's addon and the desktop app import them without
torch); `worker` holds the models. Nothing is imported here so that importing the package stays cheap.
"""
