"""The add-on's parts that need no `bpy`: camera geometry, scene files, the preference log, setup checks.

Everything here is stdlib only, so it is unit-testable outside Blender and safe to import anywhere.
"""
