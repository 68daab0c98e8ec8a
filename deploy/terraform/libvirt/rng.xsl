<?xml version="1.0"?>
<!-- Adds a virtio RNG fed by the host's /dev/urandom to the domain. -->
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:output omit-xml-declaration="yes" indent="yes"/>
  <xsl:template match="node()|@*">
    <xsl:copy><xsl:apply-templates select="node()|@*"/></xsl:copy>
  </xsl:template>
  <xsl:template match="/domain/devices">
    <xsl:copy>
      <xsl:apply-templates select="node()|@*"/>
      <rng model="virtio"><backend model="random">/dev/urandom</backend></rng>
    </xsl:copy>
  </xsl:template>
</xsl:stylesheet>
